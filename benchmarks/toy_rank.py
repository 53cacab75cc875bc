"""The rank level on the toy model: ASR and utility after the orthogonal projection for a grid of
kept ranks, a random-direction control, and the overlap analysis (Jaccard index and subspace
similarity per layer) as tables and heat maps.

    python -m benchmarks.toy_rank                         # figures to benchmarks/figures/
    python -m benchmarks.toy_rank --quick --out /tmp/x    # a smaller grid: a smoke run

R = 128 for every layer of the toy model. ``keep_u``/``keep_s`` are the directions Π_u and Π_s
keep (the paper's r_u = R − keep_u, r_s = R − keep_s); "ranks" is Σ rank(ΔW) / Σ R.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from benchmarks.common import header, table

GRID = [(12, 3), (16, 2), (16, 3), (16, 4), (20, 3), (24, 6), (32, 4), (48, 8)]
QUICK_GRID = [(16, 3)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one grid point: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures")
    args = parser.parse_args(argv)

    import pyattr
    from pyattr import toy
    from pyattr.analysis import heatmap, jaccard, overlap_table, save_table, similarities
    from pyattr.data import load_pairs
    from pyattr.lowrank import edit_ranks, eigenbases, remove_random
    from pyattr.masks import region
    from pyattr.toy.measure import asr, utility_accuracy
    from pyattr.toy.recipe import Recipe, make_splits

    model, tok = toy.load(progress=False)
    splits = make_splits(Recipe())
    paths = toy.data(progress=False)
    t0 = time.perf_counter()
    stats = [
        pyattr.calibrate(
            model, tok, load_pairs(paths[name]), collect=("norms", "covariance"), progress=False
        )
        for name in ("safety_calibration", "utility_calibration")
    ]
    safety, utility = (eigenbases(model, s, progress=False) for s in stats)
    prepared = time.perf_counter() - t0

    def measure(subject) -> tuple[str, str]:
        return (
            f"{asr(subject, tok, splits.harmful_eval):.2f}",
            f"{utility_accuracy(subject, tok, splits.utility_eval):.3f}",
        )

    a, u = measure(model)
    rows = [{"edit": "none (aligned)", "ranks": "0", "asr": a, "util": u}]
    for keep_u, keep_s in QUICK_GRID if args.quick else GRID:
        edited = copy.deepcopy(model)
        t1 = time.perf_counter()
        report = edit_ranks(edited, "orthogonal", safety, utility, keep_u=keep_u, keep_s=keep_s)
        seconds = time.perf_counter() - t1
        a, u = measure(edited)
        rows.append(
            {
                "edit": f"orthogonal, keep_u={keep_u}, keep_s={keep_s}",
                "ranks": f"{report.fraction:.1%}",
                "asr": a,
                "util": u,
                "s": f"{seconds:.3f}",
            }
        )
        if (keep_u, keep_s) == (16, 3):
            control = copy.deepcopy(model)
            remove_random(control, report, seed=0)
            a, u = measure(control)
            rows.append(
                {"edit": "random directions, same ranks", "ranks": rows[-1]["ranks"], "asr": a}
                | {"util": u}
            )

    args.out.mkdir(parents=True, exist_ok=True)
    _, counts = region(model, *stats, score="wanda", q=0.05, p=0.05)
    overlap = {
        "jaccard": (jaccard(counts), "Jaccard index, Wanda top 5% (safety vs utility)"),
        "subspace": (
            similarities(utility, safety, r_u=16, r_s=16),
            "subspace similarity, top 16 ranks (utility vs safety)",
        ),
    }
    written = []
    for name, (values, title) in overlap.items():
        table_rows = overlap_table(values, model)
        written.append(save_table(table_rows, args.out / f"toy_{name}.csv"))
        written.append(heatmap(table_rows, args.out / f"toy_{name}.png", title=title))
    out = "\n".join(
        [
            f"# toy rank level · {header('cpu')}",
            f"covariance passes + eigenbases of 28 layers: {prepared:.1f} s; "
            "ASR on 108 held-out harmful prompts, utility on 200 held-out items",
            "",
            table(
                rows,
                [
                    ("edit", "edit"),
                    ("ranks", "ranks removed"),
                    ("asr", "ASR"),
                    ("util", "utility"),
                    ("s", "edit s"),
                ],
            ),
            "",
            "written: " + ", ".join(str(p) for p in written),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
