"""The eigenbasis of ``A = W C Wᵀ`` by its two routes (issue 19): the direct d_out × d_out
eigendecomposition against the input side (C = F Fᵀ, then a thin SVD of W F), at the shapes of
Llama projections whose d_out exceeds d_in (gate/up) and one the other way round.

    python -m benchmarks.eigen_routes            # scaled shapes on the CPU, real ones on CUDA
    python -m benchmarks.eigen_routes --quick    # tiny shapes: a smoke run

Floor (FLOPs, leading terms): direct = forming A (2·d_out·d_in² + 2·d_out²·d_in) plus an
eigendecomposition of d_out (~9·d_out³ for eigenvalues and vectors); input side = C's
eigendecomposition (~9·d_in³), W F (2·d_out·d_in²) and a thin SVD of a d_out × d_in matrix
(~14·d_out·d_in² + 8·d_in³). At d_out/d_in = 2.7 (Llama-2-7B gate/up) the input side needs about
a third of the direct route's FLOPs, and holds d_out·d_in instead of d_out² entries.

The lean route (``pyattr.eigenstore.lean_eigenbasis``, the streamed default) forms the d_in
Gram problem for d_out > d_in (about the input side's FLOPs without the SVD) and A in chunks
otherwise, in little memory. Each row reports every route's time, the speed-ups over the
direct route, and against the float64 direct route (the definition) the largest eigenvalue
difference relative to the top eigenvalue and the smallest principal-angle cosine of the top
256 eigenvectors (1 means the same span): in float32 rows, the float32 error.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import compare, header, table
from pyattr.eigenstore import lean_eigenbasis
from pyattr.lowrank import eigenbasis

CPU_SHAPES = [(2752, 1024), (3584, 1024), (1024, 2752)]  # Llama-2-7B / Llama-3-8B ratios, 1/4
CUDA_SHAPES = [(11008, 4096), (14336, 4096), (4096, 11008)]
QUICK_SHAPES = [(96, 40), (40, 96)]
ROUTES = ("direct", "input", "lean")
COLUMNS = [
    ("shape", "W (d_out × d_in)"),
    ("dtype", "dtype"),
    *[(r, f"{r} s") for r in ROUTES],
    ("ratio", "input / lean speed-up over direct"),
    *[(f"{r}_values", f"{r}: max |Δλ| / λ₁") for r in ROUTES],
    *[(f"{r}_cos", f"{r}: min cos (top 256)") for r in ROUTES],
]


def layer(shape, device: str, dtype: torch.dtype, gen: torch.Generator):
    """A weight and the covariance of activations with a decaying spectrum (as real ones)."""
    d_out, d_in = shape
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    n = 2 * d_in
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x *= torch.logspace(0, -1.5, d_in, dtype=torch.float64)
    return w.to(device=device, dtype=dtype), (x.T @ x).to(device), n


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if cuda else CPU_SHAPES)
    dtypes = [torch.float64, torch.float32] if cuda or args.quick else [torch.float64]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        w64, c, n = layer(shape, args.device, torch.float64, gen)
        reference = eigenbasis(w64, c, n, route="direct")  # fp64, the definition
        top, k = float(reference.values[0]), min(256, reference.rank)
        for dtype in dtypes:
            w = w64.to(dtype)
            out = {}

            def run(route, out=out, w=w, c=c, n=n, dtype=dtype):
                if route == "lean":
                    values, vectors_t, _ = lean_eigenbasis(w, c, n, dtype=dtype)
                    out[route] = (values, vectors_t.T)
                else:
                    basis = eigenbasis(w, c, n, dtype=dtype, route=route)
                    out[route] = (basis.values, basis.vectors)

            times = compare({r: (lambda r=r: run(r)) for r in ROUTES}, args.device, args.reps)
            row = {"shape": f"{shape[0]}×{shape[1]}", "dtype": str(dtype).removeprefix("torch.")}
            row["ratio"] = " / ".join(f"{times['direct'] / times[r]:.1f}x" for r in ROUTES[1:])
            for route in ROUTES:
                values, vectors = out[route]
                overlap = vectors[:, :k].T.double() @ reference.vectors[:, :k]
                error = float((values.double() - reference.values).abs().max()) / top
                row[route] = f"{times[route]:.2f}"
                row[f"{route}_values"] = f"{error:.1e}"
                row[f"{route}_cos"] = f"{float(torch.linalg.svdvals(overlap).min()):.9f}"
            rows.append(row)
    text = f"Eigenbasis routes · {header(args.device)}\n\n{table(rows, COLUMNS)}"
    print(text)
    return text


if __name__ == "__main__":
    main()
