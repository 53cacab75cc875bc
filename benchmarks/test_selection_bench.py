"""pytest-benchmark suite for the selection ops: ``pytest benchmarks --benchmark-only``.

Each case records the bytes it must move, GB/s and the speed-up over the sort-based reference
measured in the same run in ``extra_info``. The cases are those of ``benchmarks.selection``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import compare, sync
from benchmarks.selection import LLAMA7B, LLAMA70B, cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = LLAMA7B + LLAMA70B if DEVICE == "cuda" else LLAMA7B[:1]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", [0, 1, 2], ids=["row", "matrix", "set_difference"])
def test_selection(benchmark, shape: tuple[int, int], op: int) -> None:
    _, ops_list = cases(shape, DEVICE, torch.Generator().manual_seed(0))
    name, nbytes, ref, fused = ops_list[op]
    t_ref = compare({"ref": ref}, DEVICE, reps=2)["ref"]

    def run():
        fused()
        sync(DEVICE)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "op": name,
            "device": DEVICE,
            "bytes": nbytes,
            "gb_per_s": nbytes / t / 1e9,
            "reference_s": t_ref,
            "speedup_vs_reference": t_ref / t,
        }
    )
