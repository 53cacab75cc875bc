"""The refusal direction on the toy model, per recipe seed: the chosen candidate, ASR in the four
variants and utility with the direction ablated, induced refusal on held-out benign how-to
requests with it added, and the same for two random directions of the same norm.

    python -m benchmarks.toy_direction              # the default recipe
    python -m benchmarks.toy_direction --seed 1     # another seed (builds that toy: minutes)
    python -m benchmarks.toy_direction --quick      # fewer prompts, one random control

The direction comes from the toy's safety calibration set against ``toy.contrast_pairs`` (its
benign how-to requests); ASR is the toy's exact judge, refusal on how-to requests the keyword
judge's.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import header, table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="recipe seed (0: the default toy)")
    parser.add_argument("--quick", action="store_true", help="36 prompts, one control")
    args = parser.parse_args(argv)

    from pyattr import toy
    from pyattr.data import load_pairs, load_prompts
    from pyattr.direction import ablated, added, random_direction, refusal_direction
    from pyattr.evaluate import KeywordJudge, generate
    from pyattr.toy.measure import MAX_NEW_TOKENS, VARIANTS, measure
    from pyattr.toy.recipe import Recipe, make_splits

    recipe = Recipe(seed=args.seed)
    model, tok = toy.load(recipe=recipe, progress=False)
    paths = toy.data(recipe, progress=False)
    t0 = time.perf_counter()
    refusals = load_pairs(paths["safety_calibration"])
    _, found = refusal_direction(model, tok, refusals, toy.contrast_pairs(recipe), progress=False)
    selected = time.perf_counter() - t0
    prompts = load_prompts(paths["harmful_eval"])
    items = make_splits(recipe).utility_eval
    if args.quick:
        prompts, items = prompts[:36], items[:80]
    howto = [p for p, _, task in items if task == "howto"]
    samples = 2 if args.quick else 5

    def induced(vector=None) -> str:
        context = added(model, vector, found.chosen.layer) if vector is not None else None
        if context is None:
            responses = generate(model, tok, howto, max_new_tokens=MAX_NEW_TOKENS)
        else:
            with context:
                responses = generate(model, tok, howto, max_new_tokens=MAX_NEW_TOKENS)
        refused = len(howto) - sum(KeywordJudge().successes(howto, responses))
        return f"{refused}/{len(howto)}"

    def row(name: str, vector=None) -> dict:
        if vector is None:
            m = measure(model, tok, prompts, items, samples=samples)
        else:
            with ablated(model, vector):
                m = measure(model, tok, prompts, items, samples=samples)
        return {"edit": name, **{v: f"{m['asr'][v]:.2f}" for v in VARIANTS}} | {
            "util": f"{m['utility']:.3f}",
            "induced": induced(vector),
        }

    rows = [row("none (aligned)"), row("refusal direction", found.direction)]
    for seed in (0,) if args.quick else (0, 1):
        rows.append(row(f"random direction (seed {seed})", random_direction(found.direction, seed)))
    c = found.chosen
    columns = [("edit", "direction ablated")] + [(v, f"ASR {v}") for v in VARIANTS]
    columns += [("util", "utility"), ("induced", "how-to refused, direction added")]
    out = "\n".join(
        [
            f"# toy refusal direction · recipe seed {args.seed} · {header('cpu')}",
            f"chosen: block {c.layer}, position {c.position} (bypass {c.bypass:.2f}, induce "
            f"{c.induce:.2f}, KL {c.kl:.2g}; unedited {found.baseline[0]:.2f} / "
            f"{found.baseline[1]:.2f}); found and selected in {selected:.1f} s",
            f"{len(prompts)} held-out harmful prompts, {len(items)} utility items, "
            f"{len(howto)} how-to requests",
            "",
            table(rows, columns),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
