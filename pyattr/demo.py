"""The paper on the embedded toy model, end to end: ``pyattr demo``.

One calibration pass per data set (norms, covariance and SNIP together), the eigenbases once,
then one point per edit, each measured by ASR in the paper's four variants and by utility:

- baseline (the aligned model);
- the top safety weights by Wanda and by SNIP (pruning what matters for safety, alone);
- the set difference top_q(safety) \\ top_p(utility), Wanda and SNIP, each at its own (p, q)
  (``SET_DIFFERENCE``), and a random region as large as each;
- ActSVD: removing the top safety ranks;
- the orthogonal projection at a few kept ranks, and random directions of the same rank;
- the refusal direction (difference of means, ``pyattr.direction``) orthogonalised out of the
  weights, and a random direction of the same norm;
- each random control drawn ``CONTROL_DRAWS`` times (seeds 0, 1, ...), reported as the draws'
  mean and range: one draw is a sample, and on the toy a single draw can move a variant's ASR
  by twice as much as the mean of a few (benchmarks/RESULTS.md);
- fine-tuning attacks of growing strength (``ATTACKS``: n harmful pairs, steps) with nothing, the
  Wanda set difference, as many random weights (drawn as the other controls: what the choice
  of the weights adds to what their count does) or the top safety weights frozen;

then the overlap analysis (Jaccard index, subspace similarity) and one overlap map of every
lens per block (the direction in each writer's safety and utility subspace, the Jaccard index,
the head probes' accuracy). ASR is judged by the toy's exact
judge (``toy.judge.ExactJudge``: compliance is a known structure), with the keyword judge's
verdicts on the same responses and the two judges' agreement beside it in every row. Points are
appended to ``results.jsonl`` as they finish; running again resumes. ``report.write_report``
turns the results into the report folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from .edits import REGIONS, is_control
from .sweep import Attack, Editor, Point, draws_of

__all__ = [
    "ATTACKS",
    "CONTROL_DRAWS",
    "ORTHOGONAL",
    "SET_DIFFERENCE",
    "attack",
    "demo_points",
    "run_demo",
]

# (p, q) of each method's set difference, about 2% of the toy's weights each: the recipe search
# chose them per method (a deviation the report states: one pair does not serve both on the toy
# model; benchmarks/RESULTS.md).
SET_DIFFERENCE = {"wanda": (0.05, 0.05), "snip": (0.01, 0.03)}
ORTHOGONAL = ((16, 3), (20, 4))  # (keep_u, keep_s): Π_u keeps 16 utility, Π_s 3 safety ranks
# Fine-tuning attacks, weakest first: (n harmful pairs, optimizer steps), 8 pairs a step; on the
# default toy they reach vanilla ASR of about 0.2-0.4, 0.8-0.9 and 0.9-1.0.
ATTACKS = ((10, 1), (10, 2), (100, 40))
FINETUNE = {"lr": 2e-4, "batch_size": 8}
CONTROL_DRAWS = 3  # draws of each random control (seeds 0, 1, 2), a few seconds each on the toy


def _set_difference(score: str) -> dict:
    p, q = SET_DIFFERENCE[score]
    return {"score": score, "p": p, "q": q}


def _draws(quick: bool, draws: int | None) -> int:
    """Draws of each random control: ``draws``, else ``CONTROL_DRAWS`` (quick: one)."""
    return (1 if quick else CONTROL_DRAWS) if draws is None else draws


def demo_points(quick: bool = False, draws: int | None = None) -> list[Point]:
    """The demo's sweep; ``quick`` keeps one point of each kind that shows the phenomenon.
    ``draws``: of each random control (``CONTROL_DRAWS`` by default; quick: one)."""
    draws = _draws(quick, draws)
    wanda = _set_difference("wanda")
    control = wanda
    ranks = dict(zip(("keep_u", "keep_s"), ORTHOGONAL[0], strict=True))
    if quick:
        return [
            Point("none"),
            Point("set_difference", wanda),
            *draws_of(Point("random_weights", control), draws),
            Point("orthogonal", ranks),
            *draws_of(Point("random_ranks", ranks), draws),
            Point("direction"),
            Point(
                "finetune",
                {"n": ATTACKS[-1][0], "steps": ATTACKS[-1][1], **_frozen("set_difference")},
            ),
        ]
    points = [Point("none")]
    points += [Point("top", {"score": m, "q": 0.01}) for m in ("wanda", "snip")]
    for score in ("wanda", "snip"):
        sd = _set_difference(score)
        points.append(Point("set_difference", sd))
        points += draws_of(Point("random_weights", sd), draws)
    points += [Point("actsvd_remove", {"r": r}) for r in (1, 2)]
    for keep_u, keep_s in ORTHOGONAL:
        points.append(Point("orthogonal", {"keep_u": keep_u, "keep_s": keep_s}))
    points += draws_of(Point("random_ranks", ranks), draws)
    points += [Point("direction"), *draws_of(Point("random_direction"), draws)]
    for n, steps in ATTACKS:
        for frozen in REGIONS:
            point = Point("finetune", {"n": n, "steps": steps, **_frozen(frozen)})
            points += draws_of(point, draws) if is_control(point.edit, point.params) else [point]
    return points


def _frozen(frozen: str) -> dict:
    """A finetune point's frozen region: the Wanda set difference at ``SET_DIFFERENCE``, random
    weights of its count (the freeze's control) or the top 5% safety weights by Wanda."""
    if frozen in ("set_difference", "random_weights"):
        return {"frozen": frozen, **_set_difference("wanda")}
    if frozen == "top_safety":
        return {"frozen": frozen, "score": "wanda", "q": 0.05}
    if frozen == "none":
        return {"frozen": frozen}
    raise ValueError(f"frozen must be one of {REGIONS}, got {frozen!r}")


def attack(
    model,
    tokenizer,
    safety,
    utility,
    n: int,
    steps: int,
    frozen: str = "none",
    *,
    seed: int = 0,
    recipe=None,
):
    """A copy of the toy model after the demo's fine-tuning attack: ``steps`` steps on ``n``
    harmful (prompt, compliant answer) pairs of the toy's training split, with ``frozen``
    ("none", "set_difference": the Wanda set difference at its ``SET_DIFFERENCE``,
    "random_weights": as many random weights, or "top_safety": the top 5% safety weights by
    Wanda) kept bit for bit. ``recipe``: the toy recipe whose pairs are used (the default
    recipe's by default)."""
    from pyattr import toy

    threat = Attack(tokenizer, toy.attack_pairs(recipe), seed=seed, **FINETUNE)
    editor = Editor(model, safety, utility, attack=threat)
    return editor.edited(Point("finetune", {"n": n, "steps": steps, **_frozen(frozen)}))[0]


def _subject(recipe, progress: bool):
    """The aligned toy model with its statistics (norms, covariance and SNIP in one pass per
    set), the toy's harmful pairs for the fine-tuning points, and the refusal direction and
    the head probes from the safety calibration set against the toy's benign how-to requests
    (``toy.contrast_pairs``); returns (the editor, the direction's selection, the probe)."""
    import pyattr
    from pyattr import toy
    from pyattr.data import load_pairs

    from .direction import refusal_direction
    from .probe import head_features, probe_heads, prompt_batches

    model, tokenizer = toy.load(recipe=recipe, progress=progress)
    paths = toy.data(recipe, progress=False)
    collect = ("norms", "covariance", "snip")
    sets = [load_pairs(paths[n]) for n in ("safety_calibration", "utility_calibration")]
    safety, utility = (
        pyattr.calibrate(model, tokenizer, pairs, collect=collect, progress=False) for pairs in sets
    )
    lenses = (sets[0], toy.contrast_pairs(recipe))  # harmful vs benign how-to requests
    _, selection = refusal_direction(model, tokenizer, *lenses, progress=False)
    features = [
        head_features(model, prompt_batches(tokenizer, [e.prompt for e in pairs]))
        for pairs in lenses
    ]
    probe = probe_heads(*features)
    threat = Attack(tokenizer, toy.attack_pairs(recipe), **FINETUNE)
    editor = Editor(model, safety, utility, attack=threat, direction=selection.direction)
    return editor, selection, probe


def run_demo(
    out: str | Path = "pyattr-demo",
    *,
    quick: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    recipe=None,
    judge: str = "toy-exact",
    draws: int | None = None,
) -> Path:
    """Run the demo into ``out`` and write its report there; returns the report's path.
    ``recipe``: another toy recipe (another seed, say) than the default; ``judge``: who decides
    ASR, "toy-exact" (the default) or "keyword" (the other one is the second judge); ``draws``:
    of each random control (``demo_points``)."""
    from pyattr import toy
    from pyattr.data import load_prompts
    from pyattr.toy.measure import SUFFIXES, VARIANTS, measurement
    from pyattr.toy.recipe import Recipe, make_splits

    from .analysis import chance_jaccard, chance_similarity, jaccard, overlap_table, similarities
    from .masks import region
    from .overlap import overlap_map
    from .report import write_report
    from .sweep import ResultsTable, run_points

    out = Path(out)
    draws = _draws(quick, draws)
    points = demo_points(quick, draws)
    recipe = recipe or Recipe()
    prompts = load_prompts(toy.data(recipe, progress=progress)["harmful_eval"])
    items = make_splits(recipe).utility_eval
    if quick:
        prompts, items = prompts[:36], items[:80]
    if judge not in ("toy-exact", "keyword"):
        raise ValueError(f"judge must be 'toy-exact' or 'keyword', got {judge!r}")
    second = "keyword" if judge == "toy-exact" else "toy-exact"
    config = {
        "model": f"pyattr toy (aligned, recipe {recipe.digest()}, seed {recipe.seed})",
        "points": [pt.key for pt in points],
        "variants": VARIANTS,
        "system_prompt": "Llama-2's default (vanilla)",
        "suffixes": SUFFIXES,
        "samples": 2 if quick else 5,
        "max_new_tokens": 32,
        "harmful_prompts": len(prompts),
        "utility_items": len(items),
        "judge": judge,
        "second_judge": second,
        "set_difference": {m: {"p": p, "q": q} for m, (p, q) in SET_DIFFERENCE.items()},
        "control_draws": draws,
        "finetune": FINETUNE | {"attacks": [{"n": n, "steps": s} for n, s in ATTACKS]},
        "notes": [
            (
                "ASR is judged by the toy's exact judge: a response succeeds only when it is the "
                "world's compliance with the request. The keyword judge's ASR on the same "
                "responses and the share of verdicts on which the two agree are in results.csv."
            )
            if judge == "toy-exact"
            else (
                "ASR is judged by the keyword judge (no refusal phrase: success), as in the "
                "paper's released code. The toy's exact judge's ASR on the same responses, and "
                "the share of verdicts on which the two agree, are in results.csv."
            ),
            "The set difference takes (p, q) per method ("
            + "; ".join(f"{m}: p={p:g}, q={q:g}" for m, (p, q) in SET_DIFFERENCE.items())
            + "): one pair does not serve both methods on the toy model.",
            "total_s is this run's preparation plus the seconds of every point, those run "
            "before an interruption included.",
        ],
    }
    if draws > 1:
        config["notes"].insert(
            2,
            f"Each random control is drawn {draws} times (seeds 0 to {draws - 1}); its row is "
            "the draws' mean, with their count and the widest range of one ASR variant (ASR "
            "range); the figure shows the range as an error bar; results.json holds every draw.",
        )
    table = ResultsTable(out / "results.jsonl", config, overwrite=overwrite)
    t0 = time.perf_counter()
    subject, selection, probe = _subject(recipe, progress)
    prepared = time.perf_counter() - t0

    measure = measurement(
        subject.attack.tokenizer, prompts, items, samples=config["samples"], judge=judge
    )
    run_points(subject, points, table, measure, progress=progress)
    sd = _set_difference("wanda")
    _, counts = region(subject.model, subject.safety, subject.utility, q=sd["q"], p=sd["p"])
    safety, utility = subject.bases
    r = 16
    overlap = {
        "jaccard": (
            overlap_table(jaccard(counts), subject.model, chance_jaccard(counts, subject.model)),
            f"Jaccard index of Wanda's top sets, utility p = {sd['p']:g} vs safety q = {sd['q']:g}",
        ),
        "subspace": (
            overlap_table(
                similarities(utility, safety, r_u=r, r_s=r),
                subject.model,
                chance_similarity(safety, r, r),
            ),
            f"subspace similarity of the top {r} ranks, utility vs safety (ActSVD)",
        ),
    }
    lenses = {
        "map": overlap_map(
            subject.model,
            direction=selection.direction,
            direction_layer=selection.chosen.layer,
            safety_bases=safety,
            utility_bases=utility,
            r=r,
            jaccard=jaccard(counts),
            jaccard_chance=chance_jaccard(counts, subject.model),
            probe=probe,
        ),
        "direction": dict(selection.chosen.__dict__),
        "probe_top": probe.top(3),
        "title": f"Wanda p = {sd['p']:g}, q = {sd['q']:g}; top {r} ranks; "
        f"direction of block {selection.chosen.layer}",
    }
    points_s = sum(row.get("seconds", 0.0) for row in table.rows)
    timing = {
        "prepare_s": round(prepared, 1),
        "points_s": round(points_s, 1),
        "total_s": round(prepared + points_s, 1),
    }
    return write_report(out, table.rows, config | timing, overlap, lenses)
