"""``python -m pyattr``: a self-check that prints the versions and backends in use."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def selfcheck() -> int:
    """Run a small covariance through the best backend and the float64 reference."""
    import pyattr
    from pyattr import ops

    python = sys.version.split()[0]
    print(f"pyattr {pyattr.__version__}  torch {torch.__version__}  python {python}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    for op, impl in ops.backends().items():
        print(f"  {op:18s} {impl}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 257, generator=gen).to(torch.bfloat16)
    mask = torch.rand(3000, generator=gen) < 0.7
    acc = pyattr.StreamingCovariance(257)
    t0 = time.perf_counter()
    for part, m in zip(x.split(700), mask.split(700), strict=True):
        acc.update(part, m)
    res = acc.result()
    elapsed = time.perf_counter() - t0
    xr = x[mask].double()
    ref = xr.T @ xr
    err = float((res.covariance.double() - ref).abs().max() / ref.abs().max())
    ok = res.n == int(mask.sum()) and err < 1e-6
    print(
        f"covariance self-check: n={res.n}, max rel. error {err:.1e} vs float64, "
        f"{elapsed * 1e3:.1f} ms: {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyattr",
        description="Safety attribution by pruning and low-rank edits. With no command, run a "
        "self-check that prints the backends in use.",
    )
    parser.add_argument("command", nargs="?", default="selfcheck", choices=["selfcheck"])
    parser.parse_args(argv)
    return selfcheck()


if __name__ == "__main__":
    sys.exit(main())
