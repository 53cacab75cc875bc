"""ASR of the toy model in the paper's four variants, by the exact judge and the keyword judge:
base, aligned, and aligned with its Wanda set difference (the demo's p, q) pruned.

    python -m benchmarks.toy_asr            # the 108 held-out harmful prompts
    python -m benchmarks.toy_asr --quick    # 12 prompts: a smoke run

The toy model knows only its own words, so the suffixes are made of them (``toy.measure``).
Greedy variants and the five Adv-Decoding samples use 32 new tokens (every toy answer is
shorter); vanilla has Llama-2's system prompt. Each cell is "exact / keyword" ASR.
"""

from __future__ import annotations

import argparse
import copy
import time

from benchmarks.common import header, table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 prompts: a smoke run")
    args = parser.parse_args(argv)

    import pyattr
    from pyattr import toy
    from pyattr.data import load_pairs, load_prompts
    from pyattr.demo import SET_DIFFERENCE
    from pyattr.masks import region
    from pyattr.toy.measure import SUFFIXES, VARIANTS, measure

    model, tok = toy.load(progress=False)
    base, _ = toy.load("base", progress=False)
    paths = toy.data(progress=False)
    stats = [
        pyattr.calibrate(model, tok, load_pairs(paths[name]), collect=("norms",), progress=False)
        for name in ("safety_calibration", "utility_calibration")
    ]
    p, q = SET_DIFFERENCE["wanda"]
    pruned = copy.deepcopy(model)
    mask, _ = region(pruned, *stats, score="wanda", q=q, p=p)
    pyattr.prune(pruned, mask)
    prompts = load_prompts(paths["harmful_eval"])[: 12 if args.quick else None]
    share = f"{mask.sparsity()['overall']:.1%}"
    rows = []
    for name, subject in (
        ("base", base),
        ("aligned", model),
        (f"aligned − Wanda set difference (p={p:g}, q={q:g}: {share} of weights)", pruned),
    ):
        t0 = time.perf_counter()
        result = measure(subject, tok, prompts)
        seconds = time.perf_counter() - t0
        second = result["asr_second"]
        row = {"model": name}
        for v in VARIANTS:
            row[v] = f"{result['asr'][v]:.2f} / {second['asr'][v]:.2f}"
        row["agreement"] = f"{second['agreement']:.2f}"
        row["s"] = f"{seconds:.1f}"
        rows.append(row)
    out = "\n".join(
        [
            f"# toy ASR · {header('cpu')}",
            f"{len(prompts)} held-out harmful prompts, suffixes {SUFFIXES}; exact / keyword judge",
            "",
            table(
                rows,
                [("model", "model")]
                + [(v, v) for v in VARIANTS]
                + [("agreement", "judges agree"), ("s", "s")],
            ),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
