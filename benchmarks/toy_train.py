"""The toy's training step: a batch cut into runs of similar length (``train._chunks``) against
the whole batch in one pass, per stage of a recipe, on the pinned training threads.

    python -m benchmarks.toy_train                       # the default recipe, 100 steps a stage
    python -m benchmarks.toy_train --steps 20 --set safety_neurons=8 align_only_safety=true

The paths compute the same loss and gradient up to rounding (``tests/test_toy_train.py``); what
differs is the padding (a random batch of the toy's mixed tasks pads to about twice its tokens in
one pass) and the logits computed. Rows (``PATHS``): ms per step, tokens per step (real, and
padded as run), real tokens per second, GFLOP/s, and each path's time over the reference's
(Hugging Face's loss) measured in the same run. The floor of a step is its real tokens' FLOPs,
about 6 x parameters x tokens for the forward and backward passes. The steps run in this process,
with its own kernels; a build trains with AVX2's (``pyattr.toy.pinned``), so on an AVX-512 CPU
run it under ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` to time a build's steps.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

from benchmarks.common import header, table
from benchmarks.toy_search import parse_set
from pyattr.toy.train import CHUNK_COST

# (path, ``chunk_cost``): runs of similar length (``Recipe.chunked``); the whole batch in one
# run (logits at the predicted positions only); and the reference, one pass through Hugging
# Face's loss (logits at every position), what a recipe without ``chunked`` trains with.
PATHS = (("runs", CHUNK_COST), ("one run", math.inf), ("HF loss", None))


def captured_stages(recipe) -> list[tuple]:
    """(model, tokenizer, sources, options) of each stage of ``recipe``'s build, captured by
    running the build with ``train_stage`` replaced by a recorder (no step is taken)."""
    from pyattr.toy import train as training
    from pyattr.toy.recipe import make_splits

    seen = []
    real = training.train_stage

    def record(model, tok, sources, **options):
        model, options = copy.deepcopy((model, options))  # masks and rates key the copy's weights
        seen.append((model, tok, sources, options))

    training.train_stage = record
    try:
        training.train(recipe, make_splits(recipe))
    finally:
        training.train_stage = real
    return seen


def padding(stage, steps: int, cost: float) -> tuple[float, float]:
    """Mean real and padded tokens per step over the batches ``train_stage`` draws."""
    from pyattr.toy.train import _chunks

    _, _, sources, options = stage
    rng = random.Random(options["seed"])
    real = padded = 0
    for _ in range(steps):
        (source,) = rng.choices(sources, weights=[s[1] for s in sources])
        lengths = [len(e.input_ids) for e in rng.choices(source[0], k=source[2])]
        real += sum(lengths)
        padded += sum(len(r) * max(lengths[i] for i in r) for r in _chunks(lengths, cost))
    return real / steps, padded / steps


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per stage and path")
    parser.add_argument("--set", nargs="*", default=[], help="Recipe fields, key=value")
    args = parser.parse_args(argv)

    import dataclasses

    from pyattr.toy.recipe import Recipe
    from pyattr.toy.train import pinned_threads, train_stage

    recipe = dataclasses.replace(Recipe(), **parse_set(args.set))
    rows = []
    with pinned_threads():
        stages = captured_stages(recipe)
        for name, stage in zip(("instruction tuning", "alignment"), stages, strict=True):
            model, tok, sources, options = stage
            params = sum(p.numel() for p in model.parameters())
            times = {}
            for path, cost in PATHS:
                trial, kwargs = copy.deepcopy((model, options))
                kwargs |= {"steps": args.steps, "tick": None, "chunk_cost": cost}
                start = time.perf_counter()
                train_stage(trial, tok, sources, **kwargs)
                times[path] = (time.perf_counter() - start) / args.steps
                real, padded = padding(stage, args.steps, math.inf if cost is None else cost)
                rows.append(
                    {
                        "stage": name,
                        "path": path,
                        "ms": f"{1e3 * times[path]:.1f}",
                        "tokens": f"{real:.0f}",
                        "padded": f"{padded:.0f} ({padded / real:.2f}x)",
                        "tps": f"{real / times[path]:.0f}",
                        "gflops": f"{6 * params * real / times[path] / 1e9:.1f}",
                    }
                )
            for row in rows[-len(PATHS) :]:
                row["ratio"] = f"{times[row['path']] / times[PATHS[-1][0]]:.2f}x"
    columns = [
        ("stage", "stage"),
        ("path", "path"),
        ("ms", "ms / step"),
        ("tokens", "real tokens / step"),
        ("padded", "padded tokens / step"),
        ("tps", "real tokens / s"),
        ("gflops", "GFLOP/s (6 x params x real tokens)"),
        ("ratio", f"time / {PATHS[-1][0]}'s"),
    ]
    out = f"{header('cpu')} · {args.steps} steps a stage and path\n\n{table(rows, columns)}"
    print(out)
    return out


if __name__ == "__main__":
    main()
