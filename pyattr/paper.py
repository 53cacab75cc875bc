"""The paper's experiment as one preset: ``pyattr paper --model M --out DIR``.

Wei et al. (ICML 2024) on any Hugging Face chat model, from one set of statistics per data set:

1. data (``pyattr.sources``): AdvBench prompts, a safety set (the released short set, or one
   made by the model itself with ``pyattr data safety``), Alpaca without its refusal rows, the
   three GCG suffixes; all resolved, and every missing file named, before anything loads;
2. calibration of both sets (128 samples each, response tokens only; norms, covariance, SNIP),
   written to ``DIR/statistics/`` and reused by a rerun;
3. the eigenbases of both sets (``DIR/statistics/*.eigen.safetensors``), likewise;
4. the sweep (``pyattr.sweep``): top-q baselines, Wanda and SNIP set differences, the orthogonal
   projection, each with its random control; ASR in the paper's three variants judged by the
   released code's rule with pyattr's keyword rule beside it (agreement, Cohen's κ), the six
   zero-shot tasks; resumable point by point;
5. the report, each region's achieved fraction beside its target, far misses flagged.

``--dry-run`` prints the grid, the data, the memory plan (``pyattr.capacity``) and a predicted
time before anything runs. What the released code did, and the preset follows by default
(``RELEASED``): the first 100 AdvBench prompts, lm-eval's limit of 200 documents per task, its
keyword rule (its phrases, under 20 words a refusal), no EOS token counted, its prompt text
(Llama-2's system prompt with one space between its paragraphs, a newline after each bare
Adv-Decoding prompt: ``--no-released-format`` for pyattr's) and its calibration sample
(``datasets``' ``shuffle(seed).select(range(n))``: ``--sampling pyattr`` for pyattr's).
The grids are pyattr's: they span the paper's reported regions (~3% of weights, ~2.5% of
ranks) and include the released README's settings (SNIP p = q = 10%; r_u = 3000, r_s = 4000
of R = 4096, here as fractions of each layer's R).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa")

__all__ = ["PAPER", "Preset", "predicted_seconds", "preset_points"]


@dataclass(frozen=True)
class Preset:
    """Every setting of the paper preset; each is a command-line option too."""

    samples: int = 128  # calibration pairs per set
    collect: tuple[str, ...] = ("norms", "covariance", "snip")
    eos: bool = False  # count the EOS token after each response (the released code did not)
    scores: tuple[str, ...] = ("wanda", "snip")
    top: tuple[float, ...] = (0.01, 0.03)
    set_difference: tuple[tuple[float, float], ...] = ((0.01, 0.01), (0.03, 0.03), (0.1, 0.1))
    orthogonal: tuple[tuple[float, float], ...] = ((0.7324, 0.9766), (0.5, 0.9766))
    controls: bool = True
    control_draws: int = 1  # draws of each control; the report pools them (mean and range)
    variants: tuple[str, ...] = ("vanilla", "adv_suffix", "adv_decoding")
    decoding_samples: int = 5
    max_new_tokens: int = 256
    prompts_limit: int | None = 100  # the released code's first 100 AdvBench prompts
    tasks: tuple[str, ...] = PAPER_TASKS
    limit: float | None = 200  # lm-eval documents per task (the released code's)
    judge: str = "released"
    second_judge: str = "keyword"
    sampling: str = "datasets"  # calibration rows: datasets' shuffle(seed).select(range(n))
    sequential: bool = True  # Wanda top-q block by block, as the released code pruned


PAPER = Preset()

DATA = {  # role -> registry name of the default
    "prompts": "advbench",
    "safety": "safety-short",
    "utility": "alpaca-no-safety",
    "suffixes": "gcg-suffixes",
}


def preset_points(preset: Preset) -> list:
    """The sweep's points: the model as it is, top-q and set differences per score (each set
    difference with its random control), orthogonal projections (with random directions)."""
    from .sweep import Point, draws_of

    points = [Point("none")]
    for score in preset.scores:
        # the released code pruned top-down; pyattr's layer-by-layer runner does it for the
        # scores of forward passes (Wanda), SNIP's top-q stays one pass
        sequential = {"sequential": True} if preset.sequential and score == "wanda" else {}
        points += [Point("top", {"score": score, "q": q} | sequential) for q in preset.top]
        for p, q in preset.set_difference:
            points.append(Point("set_difference", {"score": score, "p": p, "q": q}))
            if preset.controls:
                control = Point("random_weights", {"score": score, "p": p, "q": q})
                points += draws_of(control, preset.control_draws)
    for r_u, r_s in preset.orthogonal:
        points.append(Point("orthogonal", {"r_u": r_u, "r_s": r_s}))
        if preset.controls:
            points += draws_of(
                Point("random_ranks", {"r_u": r_u, "r_s": r_s}), preset.control_draws
            )
    for point in points:
        point.check()
    return points


# Nominal figures of a GPU kind for the prediction: HBM bandwidth (B/s), dense bf16 FLOP/s.
GPU_SPEED = {
    "h100": (3.35e12, 989e12),
    "h200": (4.8e12, 989e12),
    "a100": (2.0e12, 312e12),
    "a100-40": (1.55e12, 312e12),
    "l40s": (0.86e12, 362e12),
}
EFFICIENCY = 0.4  # the share of those a real run reaches (an assumption, not a measurement)
TASK_CHOICES = {"boolq": 2, "rte": 2, "hellaswag": 4, "winogrande": 2, "arc_challenge": 4}


def predicted_seconds(
    preset: Preset,
    *,
    parameters: int,
    weight_bytes: int,
    prompts: int,
    suffixes: int,
    batch: int,
    points: int,
    gpu: str,
    gpus: int = 1,
    tensor_parallel: bool = False,
    sample_tokens: int = 512,
    prompt_tokens: int = 128,
) -> dict[str, float]:
    """A prediction (never a measurement) of each stage's seconds on ``gpus`` of kind ``gpu``:
    calibration is compute-bound (2 FLOPs per parameter and token forward, 3× that with a SNIP
    backward), generation memory-bound (every decoding step reads the weights once per batch),
    zero-shot scoring compute-bound (one forward per choice), at ``EFFICIENCY`` of the nominal
    figures. One process over several GPUs (accelerate's device_map) runs them one after
    another, as fast as one GPU; only generation with vLLM's tensor parallelism
    (``tensor_parallel``) reads the weights on every GPU at once."""
    bandwidth, flops = (x * EFFICIENCY for x in GPU_SPEED[gpu])
    spread = gpus if tensor_parallel else 1
    snip = any(c in preset.collect for c in ("snip", "grad_sum"))
    calibration = 2 * preset.samples * sample_tokens * 2 * parameters * (4 if snip else 1) / flops
    per_prompt = {"adv_suffix": suffixes, "adv_decoding": preset.decoding_samples}
    sequences = sum(prompts * per_prompt.get(v, 1) for v in preset.variants)
    steps = preset.max_new_tokens * -(-sequences // batch)
    prefill = 2 * parameters * sequences * prompt_tokens / (flops * spread)
    generation = steps * weight_bytes / (bandwidth * spread) + prefill
    documents = preset.limit if preset.limit and preset.limit >= 1 else 1000
    choices = sum(TASK_CHOICES.get(t, 4) for t in preset.tasks)
    utility = 2 * parameters * documents * choices * 256 / flops
    return {
        "calibration": calibration,
        "generation per point": generation,
        "utility per point": utility,
        "all points": points * (generation + utility),
        "total": calibration + points * (generation + utility),
    }


def with_overrides(preset: Preset, **changes) -> Preset:
    """``preset`` with the non-None ``changes``."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})


def statistics_paths(out: str | Path) -> dict[str, Path]:
    folder = Path(out) / "statistics"
    return {
        "safety": folder / "safety.stats.safetensors",
        "utility": folder / "utility.stats.safetensors",
        "safety_eigen": folder / "safety.eigen.safetensors",
        "utility_eigen": folder / "utility.eigen.safetensors",
        "prompts": folder / "prompts.txt",
    }
