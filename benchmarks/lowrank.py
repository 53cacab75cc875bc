"""Rank-level sweeps: pyattr's eigen route against the released code's route.

    python -m benchmarks.lowrank            # a small random Llama (CPU), or a 7B-shaped one in
                                            # bf16 when CUDA is there
    python -m benchmarks.lowrank --quick    # a tiny model: a smoke run

Both compute the orthogonal projection ``ΔW = (I − Π_u) Π_s W`` of every linear layer for a sweep
of ``(r_u, r_s)`` settings, from a safety and a utility set.

- released code's route: forward hooks store every counted input row (fp32, CPU); for every
  setting and layer, ``X Wᵀ`` is formed and ``torch.svd_lowrank`` gives the kept utility and
  safety directions again;
- pyattr: one streaming pass per set accumulates the covariance, ``eigenbases`` decomposes
  ``W C Wᵀ`` once per layer and set, and each setting is two thin products per layer.

Each route runs in a fresh process; peak memory is the resident-set high-water mark above what
the process held after building the model and data (CPU) or ``max_memory_allocated`` above the
same point (CUDA). The checksum Σ‖ΔW‖_F over layers and settings is compared with a reference
that stores the activations and takes an exact float64 SVD of X Wᵀ (its time is not a contender
and is not shown): ``svd_lowrank`` is randomised and agrees only to its own accuracy.

Floor: the eigen route's one-off cost is the covariance pass (a forward) plus, per layer,
``W C Wᵀ`` (2·d_out·d_in² + 2·d_out²·d_in FLOPs) and an eigendecomposition (~9·d_out³); a sweep
point is ``4·d_out·k·d_in`` FLOPs per projection. The released route pays ``2·n·d_out·d_in``
for ``X Wᵀ`` and a randomised SVD of that n × d_out matrix per set, setting and layer.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from benchmarks.calibration import Setup, _Pad, _rss_kb, build, call, store_inputs
from benchmarks.common import header, table

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, heads=8, vocab=8000)
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, heads=32)
SEVEN_B["vocab"] = 32000
QUICK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, heads=4, vocab=256)
SETTINGS = [(0.5, 0.95), (0.75, 0.9), (0.9, 0.95), (0.25, 0.98)]  # (r_u, r_s) as fractions of R


@dataclass(frozen=True)
class Job:
    setup: Setup
    samples: int
    method: str


def _kept(rank: int, r_u: float, r_s: float) -> tuple[int, int]:
    return rank - int(r_u * rank), rank - int(r_s * rank)


def _delta_norm(w: torch.Tensor, uu: torch.Tensor, us: torch.Tensor) -> float:
    y = us @ (us.T @ w)
    return float(torch.linalg.matrix_norm(y - uu @ (uu.T @ y)))


def _store(model, data) -> dict[str, torch.Tensor]:
    """Every counted input row, per layer (layers of one input group share the rows)."""
    stored, key = store_inputs(model, data)
    return {layer: stored[group] for layer, group in key.items()}


def released(model, safety, utility) -> tuple[float, float]:
    """Stored activations, then ``svd_lowrank`` of X Wᵀ for every setting and layer."""
    from pyattr.models import find_linear_layers

    layers = find_linear_layers(model)
    xs, xu = _store(model, safety), _store(model, utility)
    t0 = time.perf_counter()
    total = 0.0
    torch.manual_seed(0)
    for r_u, r_s in SETTINGS:
        for layer in layers:
            w = layer.weight.detach().float()
            keep_u, keep_s = _kept(min(w.shape), r_u, r_s)
            bases = []
            for x, k in ((xu[layer.name], keep_u), (xs[layer.name], keep_s)):
                xw = x.to(w.device) @ w.T
                _, _, v = torch.svd_lowrank(xw, q=min(k + 8, min(xw.shape)), niter=4)
                bases.append(v[:, :k])
            total += _delta_norm(w, *bases)
    return total, time.perf_counter() - t0


def eigen_route(model, safety, utility) -> tuple[float, float]:
    """Covariance in one pass per set, eigenbases once, thin projections per setting."""
    import pyattr
    from pyattr.lowrank import eigenbases

    layers = pyattr.find_linear_layers(model)
    stats = [
        pyattr.calibrate(model, _Pad(), data, collect=("covariance",), progress=False)
        for data in (utility, safety)
    ]
    bases_u, bases_s = (eigenbases(model, s, dtype=torch.float32, progress=False) for s in stats)
    t0 = time.perf_counter()
    total = 0.0
    for r_u, r_s in SETTINGS:
        for layer in layers:
            w = layer.weight.detach().float()
            bu, bs = bases_u[layer.name], bases_s[layer.name]
            keep_u, keep_s = _kept(bu.rank, r_u, r_s)
            total += _delta_norm(w, bu.top(keep_u).to(w.device), bs.top(keep_s).to(w.device))
    return total, time.perf_counter() - t0


def exact(model, safety, utility) -> tuple[float, float]:
    """The reference: stored activations, a full float64 SVD of X Wᵀ once per layer and set."""
    from pyattr.models import find_linear_layers

    xs, xu = _store(model, safety), _store(model, utility)
    vs = {}
    for layer in find_linear_layers(model):
        w = layer.weight.detach().double()
        vs[layer.name] = [
            torch.linalg.svd(x[layer.name].to(w.device).double() @ w.T, full_matrices=False)[2].T
            for x in (xu, xs)
        ]
    t0 = time.perf_counter()
    total = 0.0
    for r_u, r_s in SETTINGS:
        for layer in find_linear_layers(model):
            w = layer.weight.detach().double()
            keep_u, keep_s = _kept(min(w.shape), r_u, r_s)
            vu, vsafe = vs[layer.name]
            total += _delta_norm(w, vu[:, :keep_u], vsafe[:, :keep_s])
    return total, time.perf_counter() - t0


METHODS = {
    "reference: stored activations + exact float64 SVD": exact,
    "stored activations + svd_lowrank per setting (released code)": released,
    "pyattr: covariance pass + eigenbases once": eigen_route,
}


def _child(job: Job, queue) -> None:
    model, safety = build(job.setup, job.samples)
    _, utility = build(job.setup, job.samples)
    utility = [type(e)(e.input_ids.flip(0), e.counted) for e in utility]  # another data set
    cuda = job.setup.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS:") * 1024
    start = time.perf_counter()
    checksum, sweep = METHODS[job.method](model, safety, utility)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM:") * 1024
    queue.put((seconds, sweep, peak - base, checksum))


def run(job: Job, isolate: bool) -> tuple[float, float, int, float]:
    return call(_child, (job,), job.method, isolate)


def accuracy(setup: Setup, samples: int) -> str:
    """On block 0's up projection: relative Frobenius error of Π_k W against the exact subspace
    (float64 SVD of the stored X Wᵀ) for svd_lowrank and the eigen route in fp32 and fp64."""
    from pyattr.lowrank import eigenbasis

    model, data = build(setup, samples)
    layer = next(
        la for la in __import__("pyattr").find_linear_layers(model) if "up_proj" in la.name
    )
    x = _store(model, data)[layer.name].double()
    w = layer.weight.detach().double().cpu()
    exact = torch.linalg.svd(x @ w.T, full_matrices=False)[2].T
    routes = {
        "eigen fp64": eigenbasis(w, x.T @ x, len(x)).vectors,
        "eigen fp32": eigenbasis(w, x.T @ x, len(x), dtype=torch.float32).vectors.double(),
    }
    parts = []
    rank = min(w.shape)
    torch.manual_seed(0)
    for k in (rank // 20, rank // 2, rank - rank // 20):
        want = exact[:, :k] @ (exact[:, :k].T @ w)
        xw = (x @ w.T).float()
        low = torch.svd_lowrank(xw, q=min(k + 8, rank), niter=4)[2][:, :k].double()
        errors = {"svd_lowrank": low} | {name: v[:, :k] for name, v in routes.items()}
        scale = float(torch.linalg.matrix_norm(want))
        text = ", ".join(
            f"{name} {float(torch.linalg.matrix_norm(u @ (u.T @ w) - want)) / scale:.1e}"
            for name, u in errors.items()
        )
        parts.append(f"k={k}: {text}")
    return f"{layer.name} ({layer.d_out} x {layer.d_in}), ‖Π_k W − exact‖/‖exact‖: " + "; ".join(
        parts
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    parser.add_argument("--samples", type=int, default=None, help="per data set")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample")
    parser.add_argument("--in-process", action="store_true", help="no fresh process per method")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    shape = QUICK if args.quick else (SEVEN_B if cuda else SMALL)
    samples = args.samples or (4 if args.quick else (64 if cuda else 32))
    length = args.length or (32 if args.quick else (512 if cuda else 128))
    setup = Setup(
        shape=shape,
        samples={},
        length=length,
        device="cuda" if cuda else "cpu",
        dtype=torch.bfloat16 if cuda else torch.float32,
    )
    rows, reference = [], None
    for method in METHODS:
        seconds, sweep, peak, checksum = run(Job(setup, samples, method), not args.in_process)
        reference = checksum if reference is None else reference
        if method.startswith("reference"):
            rows.append({"method": method, "diff": "0 (reference)"})
            continue
        rows.append(
            {
                "method": method,
                "s": f"{seconds:.2f}",
                "sweep": f"{sweep:.2f}",
                "per point": f"{sweep / len(SETTINGS):.3f}",
                "peak": f"{peak / 2**20:.0f} MiB",
                "diff": f"{abs(checksum - reference) / abs(reference):.1e}",
            }
        )
    base = float(rows[1]["s"])
    for row in rows[1:]:
        row["speed-up"] = f"{base / float(row['s']):.1f}x"
    counted = samples * (length - length // 2)
    check = accuracy(setup, samples) if not cuda else ""
    out = "\n".join(
        [
            f"# rank-level sweep · {header(setup.device)}",
            f"random Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} blocks, "
            f"{setup.dtype}; {samples} samples × {length} tokens per set ({counted} counted); "
            f"{len(SETTINGS)} (r_u, r_s) settings (fractions of R): {SETTINGS}",
            "",
            table(
                rows,
                [
                    ("method", "method"),
                    ("s", "total s"),
                    ("sweep", "sweep s"),
                    ("per point", "s per setting"),
                    ("speed-up", "speed-up"),
                    ("peak", "peak extra memory"),
                    ("diff", "Σ‖ΔW‖ rel. diff to exact"),
                ],
            ),
            "",
            check,
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
