"""Streaming covariance: pyattr against the plain PyTorch a user would write.

    python -m benchmarks.covariance            # CPU sizes (or GPU sizes when CUDA is there)
    python -m benchmarks.covariance --quick    # tiny sizes, a smoke run

Baselines (plain PyTorch, full matrix): ``C.addmm_(X.float().T, X.float())`` on the counted
rows; on CUDA also the same with TF32 allowed (GPTQ-style Hessians, with its error) and
``torch.mm(X.T, X, out_dtype=torch.float32)`` (bf16 tensor cores, fp32 output) where torch
offers it. pyattr on CUDA: the cuBLAS route (one GEMM per triangle block, added in place into
the fp32 accumulator) and, when the extension has CUDA, its WMMA kernel; the goal is 1.7x the
full bf16→fp32 GEMM at d ≥ 4096 at equal accuracy (the triangle is ~half the FLOPs).
FLOPs are counted as a full GEMM's ``2·n·d²`` for every method, so "effective TFLOP/s" compares
times; pyattr executes only the upper triangle, ``n·d·(d + 256)`` FLOPs. Accuracy: the largest
error against float64 ``XᵀX``, relative to the largest diagonal entry.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import compare, header, sync, table
from pyattr import StreamingCovariance, ops

CPU_SIZES = [(1024, 512), (1024, 2048), (4096, 512), (4096, 2048), (11008, 2048)]
GPU_SIZES = [(d, n) for d in (4096, 11008, 14336) for n in (2048, 16384)]
SUITE_SIZES = [(d, n) for d in (4096, 11008, 14336, 28672) for n in (2048, 16384)]
QUICK_SIZES = [(130, 300), (520, 700)]
SIZES = {"gpu": GPU_SIZES, "gpu-suite": SUITE_SIZES, "cpu": CPU_SIZES, "quick": QUICK_SIZES}


def baseline(x: torch.Tensor, acc: torch.Tensor) -> None:
    xf = x.float()
    acc.addmm_(xf.T, xf)


def baseline_mixed(x: torch.Tensor, acc: torch.Tensor) -> None:
    acc += torch.mm(x.T, x, out_dtype=torch.float32)


def baseline_tf32(x: torch.Tensor, acc: torch.Tensor) -> None:
    """fp32 addmm of upcast X with TF32 tensor cores allowed (GPTQ-style Hessians, fast)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        baseline(x, acc)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def pyattr_once(x: torch.Tensor, backend: str | None, route: str = "cublas") -> StreamingCovariance:
    with ops.force_backend(backend), ops.cuda_covariance(route):
        acc = StreamingCovariance(x.shape[1], buffer_rows=0, device=x.device)
        acc.update(x)
        acc._flush()
    return acc


def _wmma_backend() -> str:
    with ops.cuda_covariance("wmma"):
        return ops.backends()["covariance[cuda]"]


def rel_error(cov: torch.Tensor, ref: torch.Tensor) -> float:
    return float((cov.double().to(ref.device) - ref).abs().max() / ref.diagonal().max())


def one_shot(d: int, n: int, device: str, reps: int, check: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(d * 7919 + n)
    x = (torch.randn(n, d, generator=gen) + 0.3).to(torch.bfloat16).to(device)
    flops = 2.0 * n * d * d
    ref = None
    if check:  # float64 on the device itself: the CPU would take minutes at GPU sizes
        xd = x.double()
        ref = xd.T @ xd
        del xd
    zeros = torch.zeros(d, d, device=device)
    full = {"PyTorch addmm (fp32)": baseline}  # full-matrix baselines, by how they accumulate
    if device == "cuda":
        full["PyTorch addmm (fp32, TF32 on)"] = baseline_tf32
        if ops._has_out_dtype():
            full["PyTorch mm bf16→fp32"] = baseline_mixed
    methods = {name: (lambda f=f: f(x, zeros.zero_())) for name, f in full.items()}
    methods["pyattr (PyTorch path)"] = lambda: pyattr_once(x, "torch")
    methods["pyattr"] = lambda: pyattr_once(x, None)
    wmma = device == "cuda" and "WMMA" in _wmma_backend()
    if wmma:  # the extension's kernel, kept only if it beats the cuBLAS route somewhere
        methods["pyattr (WMMA kernel)"] = lambda: pyattr_once(x, None, "wmma")
    rows = []
    medians = compare(methods, device, reps)
    base_t = medians["PyTorch addmm (fp32)"]
    for name, t in medians.items():
        row = {
            "d": d,
            "tokens": n,
            "method": name,
            "ms": f"{t * 1e3:.1f}",
            "TFLOP/s": f"{flops / t / 1e12:.3f}",
            "vs addmm": f"{base_t / t:.2f}x",
        }
        if ref is not None:
            if name in full:
                acc = torch.zeros(d, d, device=device)
                full[name](x, acc)
                row["rel. error"] = f"{rel_error(acc, ref):.1e}"
                del acc
            elif name.startswith("pyattr"):
                backend = "torch" if "PyTorch" in name else None
                route = "wmma" if "WMMA" in name else "cublas"
                cov = pyattr_once(x, backend, route).result().covariance
                row["rel. error"] = f"{rel_error(cov, ref):.1e}"
        rows.append(row)
    return rows


def streaming(d: int, samples: int, seq: int, device: str, reps: int) -> list[dict]:
    """Many 512-token samples with ~60% counted (response) tokens: the calibration pattern."""
    gen = torch.Generator().manual_seed(d + samples)
    xs = [(torch.randn(seq, d, generator=gen) + 0.3).to(torch.bfloat16).to(device)]
    xs = xs * samples
    masks = [(torch.rand(seq, generator=gen) < 0.6).to(device) for _ in range(samples)]
    counted = sum(int(m.sum()) for m in masks)
    flops = 2.0 * counted * d * d

    def per_sample_addmm():
        acc = torch.zeros(d, d, device=device)
        for x, m in zip(xs, masks, strict=True):
            baseline(x[m], acc)
        sync(device)

    def run(buffer_rows):
        def fn():
            acc = StreamingCovariance(d, buffer_rows=buffer_rows, device=device)
            for x, m in zip(xs, masks, strict=True):
                acc.update(x, m)
            acc._flush()
            sync(device)

        return fn

    methods = {
        "PyTorch addmm per sample": per_sample_addmm,
        "pyattr, unbuffered": run(0),
        "pyattr, buffered (4096 rows)": run(4096),
    }
    rows = []
    medians = compare(methods, device, reps)
    base_t = medians["PyTorch addmm per sample"]
    for name, t in medians.items():
        rows.append(
            {
                "d": d,
                "tokens": f"{samples}×{seq} ({counted} counted)",
                "method": name,
                "ms": f"{t * 1e3:.1f}",
                "TFLOP/s": f"{flops / t / 1e12:.3f}",
                "vs addmm": f"{base_t / t:.2f}x",
            }
        )
    return rows


COLUMNS = [
    ("d", "d"),
    ("tokens", "tokens"),
    ("method", "method"),
    ("ms", "median ms"),
    ("TFLOP/s", "eff. TFLOP/s"),
    ("vs addmm", "speed-up"),
    ("rel. error", "rel. error vs fp64"),
]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    parser.add_argument(
        "--sizes", choices=sorted(SIZES), help="(d, tokens) set (default: by device)"
    )
    args = parser.parse_args(argv)
    default = "quick" if args.quick else ("gpu" if args.device == "cuda" else "cpu")
    sizes = SIZES[args.sizes or default]
    rows = []
    for d, n in sizes:
        rows += one_shot(d, n, args.device, args.reps, check=not args.no_check)
    stream_d, samples = (130, 4) if args.quick else (4096 if args.device == "cpu" else 11008, 16)
    rows += streaming(stream_d, samples, 512, args.device, args.reps)
    out = f"Streaming covariance · {header(args.device)}\n\n" + table(rows, COLUMNS)
    print(out)
    return out


if __name__ == "__main__":
    main()
