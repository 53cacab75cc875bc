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

Each row reports both times, the ratio, the largest eigenvalue difference relative to the top
eigenvalue, and the smallest principal-angle cosine between the two routes' top 256
eigenvectors (1 means the same span).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import compare, header, table
from pyattr.lowrank import eigenbasis

CPU_SHAPES = [(2752, 1024), (3584, 1024), (1024, 2752)]  # Llama-2-7B / Llama-3-8B ratios, 1/4
CUDA_SHAPES = [(11008, 4096), (14336, 4096), (4096, 11008)]
QUICK_SHAPES = [(96, 40), (40, 96)]
COLUMNS = [
    ("shape", "W (d_out × d_in)"),
    ("dtype", "dtype"),
    ("direct", "direct s"),
    ("input", "input side s"),
    ("ratio", "speed-up"),
    ("values", "max |Δλ| / λ₁"),
    ("cos", "min cos (top 256)"),
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
        for dtype in dtypes:
            w, c, n = layer(shape, args.device, dtype, gen)
            out = {}

            def run(route, out=out, w=w, c=c, n=n, dtype=dtype):
                out[route] = eigenbasis(w, c, n, dtype=dtype, route=route)

            times = compare(
                {r: (lambda r=r: run(r)) for r in ("direct", "input")}, args.device, args.reps
            )
            direct, side = out["direct"], out["input"]
            top = float(direct.values[0])
            k = min(256, direct.rank)
            overlap = side.vectors[:, :k].T.double() @ direct.vectors[:, :k].double()
            cos = torch.linalg.svdvals(overlap)
            rows.append(
                {
                    "shape": f"{shape[0]}×{shape[1]}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "direct": f"{times['direct']:.2f}",
                    "input": f"{times['input']:.2f}",
                    "ratio": f"{times['direct'] / times['input']:.1f}x",
                    "values": f"{float((side.values - direct.values).abs().max()) / top:.1e}",
                    "cos": f"{float(cos.min()):.9f}",
                }
            )
    text = f"Eigenbasis routes · {header(args.device)}\n\n{table(rows, COLUMNS)}"
    print(text)
    return text


if __name__ == "__main__":
    main()
