"""The GPU suite: one command that proves and measures every kernel on the GPU at hand.

    python -m benchmarks.gpu --out gpu-results          # on a CUDA machine, about 8 minutes
    python -m benchmarks.gpu --out /tmp/g --dry-run     # every step at tiny sizes, on the CPU

Steps, each timed and run even when an earlier one failed:

1. environment: GPU, SMs, memory, torch, CUDA, Triton, transformers, whether ``pyattr._C``
   has CUDA, what serves each operator (``pyattr.ops.backends()``);
2. ceilings: device-to-device copy bandwidth and a bf16 8192³ matrix product (TFLOP/s), the
   figures every kernel is compared with;
3. tests: ``pytest -m requires_cuda`` (the selection and covariance tests at full size on the
   GPU, against the PyTorch path and float64) and the selection operators' opcheck;
4. selection at the weight shapes of Llama-2-7B, Llama-3-8B and Llama-2-70B (per row,
   matrix-wide, N:M, set difference; bool, packed and in-place outputs): GB/s, % of copy,
   speed-up over the sort-based reference, extra memory (``benchmarks.selection``);
5. covariance at d ∈ {4096, 11008, 14336, 28672}, tokens ∈ {2048, 16384}, against the
   plain-PyTorch baselines with their error against float64 (``benchmarks.covariance``);
6. calibration of a random Llama with Llama-3-8B widths (a few blocks, bf16): norms and
   covariance, then SNIP: tokens/s and peak memory against the planner's estimate; then the
   eigenbasis step on those statistics;
7. batched generation against one prompt at a time on a random 7B-shaped Llama
   (``benchmarks.generation``).

Writes ``gpu.md`` (every table) and ``gpu.json`` (the same, with each step's status and
seconds) under ``--out``, atomically, and exits non-zero naming each failed step. Without CUDA
it refuses unless ``--dry-run``, which runs the same steps at tiny sizes through the CPU and
Triton-interpreter paths so that the GPU run cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import compare, table

STEPS: list[tuple[str, Callable[[argparse.Namespace], str]]] = []


def step(name: str):
    """Register a step of the suite (run in order)."""

    def register(fn):
        STEPS.append((name, fn))
        return fn

    return register


def _device(args) -> str:
    return "cpu" if args.dry_run else "cuda"


@step("environment")
def environment(args) -> str:
    import transformers

    from pyattr import ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", triton_version),
        ("transformers", transformers.__version__),
        ("pyattr._C", ops.extension_error() or "loaded"),
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows += [
            ("GPU", p.name),
            ("SMs", str(p.multi_processor_count)),
            ("memory", f"{p.total_memory / 2**30:.1f} GiB"),
            ("compute capability", f"{p.major}.{p.minor}"),
            ("cuBLAS route adds in place", str(_addmm_in_place())),
        ]
    else:
        rows.append(("GPU", "none (dry run)"))
    rows += list(ops.backends().items())
    return table([{"what": k, "value": v} for k, v in rows], [("what", "what"), ("value", "")])


def _addmm_in_place() -> bool:
    """Whether the covariance's cuBLAS route adds each block in place (addmm with out_dtype
    and out=block passed its self-check) or through a temporary."""
    from pyattr.ops.covariance import _has_addmm_out_dtype

    return _has_addmm_out_dtype()


@step("ceilings")
def ceilings(args) -> str:
    device = _device(args)
    n = (1 << 20) if args.dry_run else (256 << 20)  # floats: 4 MiB or 1 GiB
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = compare({"copy": lambda: dst.copy_(src)}, device, reps=5)["copy"]
    size = 512 if args.dry_run else 8192
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t_mm = compare({"mm": lambda: a @ b}, device, reps=5)["mm"]
    rows = [
        {"ceiling": "copy bandwidth", "value": f"{2 * n * 4 / t_copy / 1e9:.0f} GB/s"},
        {"ceiling": f"{dtype} {size}³ matmul", "value": f"{2 * size**3 / t_mm / 1e12:.1f} TFLOP/s"},
    ]
    return table(rows, [("ceiling", "ceiling"), ("value", "measured")])


@step("tests")
def tests(args) -> str:
    root = Path(__file__).resolve().parent.parent
    commands = [
        ["-m", "requires_cuda", "tests"],
        ["tests/test_selection.py", "-k", "opcheck or compiles or without_triton"],
    ]
    rows, failed = [], []
    for extra in commands:
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
            cwd=root,
            capture_output=True,
            text=True,
        )
        summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
        rows.append(
            {
                "tests": " ".join(extra),
                "result": summary,
                "s": f"{time.perf_counter() - start:.0f}",
            }
        )
        if run.returncode not in (0, 5):  # 5: nothing collected
            failed.append(" ".join(extra))
            print(run.stdout[-4000:], run.stderr[-2000:], sep="\n", file=sys.stderr)
    out = table(rows, [("tests", "pytest"), ("result", "result"), ("s", "s")])
    if failed:
        raise StepFailed(out, f"failing tests in: {failed}")
    return out


@step("selection")
def selection(args) -> str:
    from benchmarks import selection as bench

    if args.dry_run:  # the Triton kernels in the interpreter, and the PyTorch path
        out = "\n\n".join(
            bench.main(["--device", "cpu", "--quick", "--reps", "1", "--backend", backend, *extra])
            for backend, extra in [
                ("triton", []),
                ("torch", []),
                ("triton", ["--ops", "matrix", "--matrix-select", "twopass"]),
            ]
        )
        os.environ.pop("PYATTR_MATRIX_SELECT", None)
        return out
    default = bench.main(["--device", "cuda", "--shapes", "gpu-suite", "--reps", "5"])
    # the prepared alternative for long rows: four histogram passes instead of 31 counts
    radix = bench.main(["--device", "cuda", "--shapes", "long-rows", "--row-select", "radix"])
    os.environ.pop("PYATTR_ROW_SELECT", None)
    # and for matrix-wide selects: a bucket histogram and one compaction pass instead of six
    matrix_only = ["--ops", "matrix", "--matrix-select", "twopass"]
    twopass = bench.main(["--device", "cuda", "--shapes", "gpu-suite", *matrix_only])
    os.environ.pop("PYATTR_MATRIX_SELECT", None)
    return "\n\n".join([default, radix, twopass])


@step("covariance")
def covariance(args) -> str:
    from benchmarks import covariance as bench

    if args.dry_run:
        return bench.main(["--device", "cpu", "--quick", "--reps", "1"])
    return bench.main(["--device", "cuda", "--sizes", "gpu-suite", "--reps", "3"])


@step("calibration")
def calibration(args) -> str:
    import pyattr
    from benchmarks.calibration import LLAMA3_8B, random_llama

    device = _device(args)
    if args.dry_run:
        shape, blocks, samples, length, dtype = (
            {"hidden_size": 64, "intermediate_size": 96, "heads": 4, "kv_heads": 2, "vocab": 256},
            2,
            4,
            32,
            torch.float32,
        )
    else:
        shape, blocks, samples, length, dtype = LLAMA3_8B, 4, 64, 512, torch.bfloat16
    model, data = random_llama(shape, blocks, samples, length, device, dtype)
    rows = []
    for collect, n in ((("norms", "covariance"), samples), (("snip",), max(2, samples // 8))):
        plan = pyattr.plan_calibration(model, collect=collect)
        planned = sum(plan.peak().values())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        stats = pyattr.calibrate(model, None, data[:n], collect=collect, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        rows.append(
            {
                "collect": "+".join(collect),
                "samples": n,
                "tok/s": f"{stats.tokens / seconds:.0f}",
                "s": f"{seconds:.2f}",
                "peak": "n/a" if peak is None else f"{peak / 2**30:.2f} GiB",
                "planned": f"{planned / 2**30:.2f} GiB",
            }
        )
        if "covariance" in collect:  # the eigenbasis step, on block 0 (one of every shape)
            first = [layer for layer in pyattr.find_linear_layers(model) if layer.block == 0]
            start = time.perf_counter()
            pyattr.eigenbases(model, stats, layers=first, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            eigen_s = time.perf_counter() - start
    widths = f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}"
    columns = [
        ("collect", "statistics"),
        ("samples", "samples"),
        ("tok/s", "counted tok/s"),
        ("s", "s"),
        ("peak", "peak above model"),
        ("planned", "planner's estimate"),
    ]
    return (
        f"Random Llama, {blocks} blocks ({widths}, {dtype}), samples of {length} tokens, "
        f"the second half of each counted.\n\n{table(rows, columns)}\n\n"
        f"Eigenbases (float64) of block 0's {len(first)} layers from the covariances: "
        f"{eigen_s:.2f} s."
    )


@step("eigen-routes")
def eigen_routes(args) -> str:
    from benchmarks import eigen_routes as bench

    if args.dry_run:
        return bench.main(["--quick", "--device", "cpu", "--reps", "1"])
    return bench.main(["--device", "cuda", "--reps", "3"])


@step("generation")
def generation(args) -> str:
    from benchmarks import generation as bench

    if args.dry_run:
        return bench.main(["--quick"])
    # the batch: the largest that fits (all 64 prompts on an 80 GB GPU)
    return bench.main(["--prompts", "64", "--single-prompts", "4", "--max-new-tokens", "64"])


class StepFailed(Exception):
    """A step that produced its output but must count as failed (failing tests)."""

    def __init__(self, output: str, reason: str) -> None:
        super().__init__(reason)
        self.output = output


def run(args) -> tuple[list[dict], list[str]]:
    results, failed = [], []
    for name, fn in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            output, status = fn(args), "ok"
        except StepFailed as exc:
            output, status = exc.output + f"\n\n**FAILED**: {exc}", "failed"
        except Exception:  # a step's failure must not stop the others
            output, status = "```\n" + traceback.format_exc()[-3000:] + "```", "failed"
        seconds = time.perf_counter() - start
        print(output, flush=True)
        if status == "failed":
            failed.append(name)
        results.append(
            {"step": name, "status": status, "seconds": round(seconds, 1)} | {"output": output}
        )
    return results, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu.md and gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--only", nargs="+", choices=[n for n, _ in STEPS], help="these steps")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device here; run it on a GPU machine, or check the suite "
            "on this one with --dry-run",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pyattr.io import atomic_write

    start = time.perf_counter()
    results, failed = run(args)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [
        "# pyattr GPU suite" + (" (dry run: tiny sizes on the CPU)" if args.dry_run else ""),
        "",
        f"{when} · `{command}` · {time.perf_counter() - start:.0f} s in all",
        "",
        table(
            [{k: r[k] for k in ("step", "status", "seconds")} for r in results],
            [("step", "step"), ("status", "status"), ("seconds", "s")],
        ),
    ]
    body = [f"## {r['step']}\n\n{r['output']}" for r in results]
    out = Path(args.out)
    atomic_write(out / "gpu.md", "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n")
    payload = {"date": when, "command": command, "dry_run": args.dry_run, "steps": results}
    atomic_write(out / "gpu.json", json.dumps(payload, indent=1) + "\n")
    print(f"\nwritten: {out / 'gpu.md'}, {out / 'gpu.json'}")
    if failed:
        print(f"benchmarks.gpu: FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
