"""pytest-benchmark suite for the streaming covariance: ``pytest benchmarks --benchmark-only``.

Each case records bytes, effective TFLOP/s (2·n·d² FLOPs, a full GEMM's count) and the speed-up
over the PyTorch baseline measured in the same run in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import measure, sync
from benchmarks.covariance import baseline, pyattr_once

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(4096, 2048), (11008, 2048)] if DEVICE == "cpu" else [(4096, 16384), (14336, 16384)]


@pytest.mark.parametrize(("d", "n"), SIZES, ids=lambda v: str(v))
def test_covariance(benchmark, d: int, n: int) -> None:
    gen = torch.Generator().manual_seed(d + n)
    x = (torch.randn(n, d, generator=gen) + 0.3).to(torch.bfloat16).to(DEVICE)

    def run():
        pyattr_once(x, None)
        sync(DEVICE)

    base = measure(lambda: baseline(x, torch.zeros(d, d, device=DEVICE)), DEVICE, reps=2)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "device": DEVICE,
            "bytes_read": x.numel() * x.element_size(),
            "bytes_accumulator_rmw": 2 * d * d * 4,
            "effective_tflops": 2.0 * n * d * d / t / 1e12,
            "baseline_s": base["median"],
            "speedup_vs_addmm": base["median"] / t,
        }
    )
