"""``python -m pyattr``: the command line (``pyattr --help``); with no command, a self-check that
prints the versions and backends in use."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

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


def toy_command(args: argparse.Namespace) -> int:
    """Build (or rebuild) the embedded toy model and print where it is cached."""
    from pyattr import toy

    entry = toy.build(force=args.force, progress=not args.quiet)
    manifest = json.loads((entry / "manifest.json").read_text())
    print(f"toy model: {entry}")
    print(f"  trained in {manifest['train_seconds']} s; data sets in {entry / 'data'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyattr",
        description="Safety attribution by pruning and low-rank edits (Wei et al., ICML 2024). "
        "Start with `pyattr demo`: the whole paper on the embedded toy model, with a report. "
        "Each stage is a command that reads and writes the others' files. With no command, run "
        "a self-check that prints the backends in use.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("selfcheck", help="print versions and backends; check the covariance")
    toy = commands.add_parser(
        "toy",
        help="the embedded toy chat model",
        description="Train and cache the embedded toy chat model (base and aligned) and its "
        "data sets; anything that needs it builds it on first use.",
    )
    toy.add_argument("action", choices=["build"], help="build it (if not cached) and say where")
    toy.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    toy.add_argument("--quiet", action="store_true", help="no progress bar")
    from pyattr.cli import add_commands

    add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "toy":
        return toy_command(args)
    if hasattr(args, "run"):
        shown = warnings.formatwarning  # a warning is one line for a person, not source code
        warnings.formatwarning = lambda message, *_args, **_kw: f"pyattr: warning: {message}\n"
        try:
            return args.run(args)
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as exc:
            print(f"pyattr {args.command}: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a full disk, an unreadable file: expected, named, one line
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            print(f"pyattr {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
            return 2
        finally:
            warnings.formatwarning = shown
    return selfcheck()


if __name__ == "__main__":
    sys.exit(main())
