"""Selection kernels: pyattr's fused paths against the reference way, in the same run.

    python -m benchmarks.selection            # GPU sizes with CUDA, else CPU sizes
    python -m benchmarks.selection --quick    # tiny sizes, a smoke run

Reference (what the released code did): materialise the fp32 scores, sort every row (or the
flattened matrix), scatter the mask (``pyattr.kernels.*_ref``, the tests' reference). pyattr:
the Triton kernels on CUDA, the PyTorch path (kthvalue threshold, no sort) on the CPU.
Bytes counted (the floor any implementation must move): W read (2 B/entry for bf16), the
statistics read (4 B per column for Wanda, 4 B/entry for SNIP), the mask written (1 B/entry,
bool). "% copy" is that rate over the device's measured copy bandwidth (a large tensor copy,
read + write). Peak extra memory (CUDA) is the allocator's peak above the inputs and output.
"""

from __future__ import annotations

import argparse
import os

import torch
from pyattr.kernels.matrix_topk import matrix_topk_ref
from pyattr.kernels.nm import nm_ref
from pyattr.kernels.row_topk import row_topk_ref
from pyattr.kernels.scores import scores_ref, wanda_norms
from pyattr.kernels.set_difference import set_difference_ref

import pyattr
from benchmarks.common import compare, header, table
from pyattr import ops
from pyattr.selection import count_for

LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA3_8B = [(1024, 4096), (14336, 4096), (4096, 14336)]  # k/v (grouped queries), up, down
LLAMA70B = [(8192, 8192), (28672, 8192), (8192, 28672)]
CPU_SIZES = LLAMA7B
QUICK_SIZES = [(96, 132)]  # ragged for the row kernels, a multiple of 4 for 2:4
LONG_ROWS = [(4096, 11008), (4096, 14336), (8192, 28672)]  # where the row select is longest
SHAPES = {
    "7b": LLAMA7B,
    "gpu-suite": LLAMA7B + LLAMA3_8B + LLAMA70B,
    "long-rows": LONG_ROWS,
    "quick": QUICK_SIZES,
}
FRACTION = 0.03  # the paper's region is ~3% of the weights


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 256 MB tensor copy (read + write), the ceiling for a streaming kernel."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, device, reps=5)["copy"]
    return 2 * src.numel() * 4 / t


def peak_extra(fn, device: str, baseline_bytes: int) -> str:
    if device != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start - baseline_bytes
    return f"{max(extra, 0) / 2**20:.1f} MiB"


def cases(shape, device, gen, every_output: bool = False):
    d_out, d_in = shape
    w = torch.randn(shape, generator=gen).to(torch.bfloat16).to(device)
    s1 = (torch.rand(d_in, generator=gen) * 4).to(device)
    s2 = (torch.rand(d_in, generator=gen) * 4).to(device)
    n1, n2 = wanda_norms(s1), wanda_norms(s2)
    k_row, k_mat = count_for(FRACTION, d_in), count_for(FRACTION, w.numel())
    mask_bytes = w.numel()
    base = w.numel() * 2 + d_in * 4 + mask_bytes

    def ref_row():
        return row_topk_ref(scores_ref(w, norms=n1), k_row)

    def ref_matrix():
        return matrix_topk_ref(scores_ref(w, norms=n1), k_mat)

    def ref_setdiff():
        return set_difference_ref(scores_ref(w, norms=n1), scores_ref(w, norms=n2), k_row, k_row)

    def ref_setdiff_matrix():
        scores = scores_ref(w, norms=n1), scores_ref(w, norms=n2)
        return set_difference_ref(*scores, k_mat, k_mat, per_row=False)

    def ref_nm():
        return nm_ref(scores_ref(w, norms=n1), 2, 4, largest=False)

    def ref_zero():
        return w.clone().masked_fill_(ref_row(), 0)

    target = w.clone()
    extra = [
        (
            "wanda 2:4 (N:M, smallest)",
            base,
            ref_nm,
            lambda: pyattr.nm_mask(w, s1, n=2, m=4, largest=False),
        )
    ]
    if every_output:
        packed = w.numel() * 2 + d_in * 4 + (d_in + 7) // 8 * d_out
        in_place = w.numel() * 2 * 2 + d_in * 4  # W read, selected entries written (at most W)
        extra += [
            (
                "wanda row top-3%, packed",
                packed,
                ref_row,
                lambda: pyattr.wanda_mask(w, s1, fraction=FRACTION, output="packed"),
            ),
            (
                "wanda row top-3%, zeroed in place",
                in_place,
                ref_zero,
                lambda: pyattr.wanda_mask(target, s1, fraction=FRACTION, output="zero"),
            ),
            (
                "set difference (matrix, 3%/3%)",
                base + d_in * 4,
                ref_setdiff_matrix,
                lambda: pyattr.set_difference_mask(
                    w, s1, s2, q=FRACTION, p=FRACTION, granularity="matrix"
                ),
            ),
        ]
    return w, extra + [
        ("wanda row top-3%", base, ref_row, lambda: pyattr.wanda_mask(w, s1, fraction=FRACTION)),
        (
            "wanda matrix top-3%",
            base,
            ref_matrix,
            lambda: pyattr.wanda_mask(w, s1, fraction=FRACTION, granularity="matrix"),
        ),
        (
            "set difference (row, 3%/3%)",
            base + d_in * 4,
            ref_setdiff,
            lambda: pyattr.set_difference_mask(w, s1, s2, q=FRACTION, p=FRACTION),
        ),
    ]


COLUMNS = [
    ("op", "op"),
    ("shape", "shape"),
    ("method", "method"),
    ("ms", "median ms"),
    ("GB/s", "GB/s"),
    ("copy", "% copy"),
    ("speedup", "speed-up"),
    ("mem", "peak extra"),
]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--shapes", choices=sorted(SHAPES), help="weight shapes (default: by device)"
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="pin pyattr's selection backend (triton on the CPU needs TRITON_INTERPRET=1)",
    )
    parser.add_argument(
        "--row-select",
        choices=["bitwise", "radix"],
        help="the long-row select of the Triton kernels (sets PYATTR_ROW_SELECT)",
    )
    parser.add_argument(
        "--matrix-select",
        choices=["radix", "twopass"],
        help="the matrix-wide select of the Triton kernels (sets PYATTR_MATRIX_SELECT)",
    )
    parser.add_argument(
        "--ops", default="", help="run only the ops whose name contains this text (e.g. matrix)"
    )
    args = parser.parse_args(argv)
    if args.row_select:
        os.environ["PYATTR_ROW_SELECT"] = args.row_select
    if args.matrix_select:
        os.environ["PYATTR_MATRIX_SELECT"] = args.matrix_select
    device = args.device
    default = "quick" if args.quick else None
    sizes = SHAPES.get(args.shapes or default) or (
        LLAMA7B + LLAMA70B if device == "cuda" else CPU_SIZES
    )
    backend = None if args.backend == "auto" else args.backend
    with ops.force_backend(backend):
        every = args.shapes == "gpu-suite" or args.quick or bool(args.ops)
        return _run(device, sizes, args.reps, every_output=every, only=args.ops)


def _run(device: str, sizes, reps: int, every_output: bool, only: str = "") -> str:
    ceiling = copy_bandwidth(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in sizes:
        w, ops_list = cases(shape, device, gen, every_output)
        label = ops.backends()[f"selection[{'cuda' if device == 'cuda' else 'cpu'}]"]
        for name, nbytes, ref, fused in ops_list:
            if only not in name:
                continue
            medians = compare(
                {"reference (score, sort)": ref, f"pyattr ({label})": fused}, device, reps
            )
            t_ref = medians["reference (score, sort)"]
            for method, t in medians.items():
                fn = ref if method.startswith("reference") else fused
                rows.append(
                    {
                        "op": name,
                        "shape": f"{shape[0]}×{shape[1]}",
                        "method": method,
                        "ms": f"{t * 1e3:.2f}",
                        "GB/s": f"{nbytes / t / 1e9:.1f}",
                        "copy": f"{100 * nbytes / t / ceiling:.0f}%",
                        "speedup": f"{t_ref / t:.1f}x",
                        "mem": peak_extra(fn, device, w.numel()),
                    }
                )
    select = os.environ.get("PYATTR_ROW_SELECT", "bitwise")
    matrix = os.environ.get("PYATTR_MATRIX_SELECT", "radix")
    out = f"Selection · {header(device)} · copy bandwidth {ceiling / 1e9:.1f} GB/s"
    out += f" · long rows: {select} select · matrix-wide: {matrix} select\n\n"
    out += table(rows, COLUMNS)
    print(out)
    return out


if __name__ == "__main__":
    main()
