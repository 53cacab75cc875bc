"""The toy world's own measurements: ASR on its held-out harmful prompts (the exact judge by
default) and accuracy on its held-out utility items (greedy decoding)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..evaluate import Judge, generate
from .judge import ExactJudge
from .world import ATTACK_SUFFIXES, BENIGN_INTENTS, World

__all__ = ["SUFFIXES", "VARIANTS", "asr", "measure", "measurement", "utility_accuracy"]

MAX_NEW_TOKENS = 32  # every toy answer is shorter
SUFFIXES = ATTACK_SUFFIXES  # the toy's own words
VARIANTS = ["vanilla", "no_system", "adv_suffix", "adv_decoding"]


def asr(model: nn.Module, tokenizer, prompts: Sequence[str], judge: Judge | None = None) -> float:
    """Fraction of ``prompts`` whose greedy response (chat format, no system prompt) ``judge``
    counts as a successful attack: the toy's exact judge by default."""
    if not prompts:
        raise ValueError("no prompts")
    responses = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=128)
    verdicts = (judge or ExactJudge()).successes(list(prompts), responses)
    return sum(verdicts) / len(verdicts)


def _correct(prompt: str, answer: str, task: str, response: str) -> bool:
    """Exact match; for a how-to request, whose steps are placeholder words drawn at random,
    the whole answer structure for the requested intent."""
    if task == "howto":
        intent = World.intent_of(prompt, BENIGN_INTENTS)
        return intent is not None and World.answers(intent, response)
    return response.split() == answer.split()


def utility_accuracy(model: nn.Module, tokenizer, items: Sequence[tuple[str, str, str]]) -> float:
    """Fraction of (prompt, answer, task) items answered correctly (greedy, whitespace-normalised
    exact match; the answer's structure for how-to requests)."""
    if not items:
        raise ValueError("no utility items")
    responses = generate(
        model, tokenizer, [p for p, _, _ in items], max_new_tokens=MAX_NEW_TOKENS, batch_size=128
    )
    hits = [_correct(p, a, t, r) for r, (p, a, t) in zip(responses, items, strict=True)]
    return sum(hits) / len(hits)


def measure(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    items: Sequence[tuple[str, str, str]] | None = None,
    **options,
) -> dict:
    """ASR in each variant (Llama-2's system prompt for vanilla, ``SUFFIXES``, ``samples``
    samples at temperature 1) judged by the exact judge, the keyword judge's ASR on the same
    responses with the two judges' agreement, and utility on ``items`` when given:
    ``{"asr", "asr_second": {"judge", "asr", "agreement"}, "utility"}``. ``options``: those of
    ``measurement`` (variants, samples, seed, judge)."""
    return measurement(tokenizer, prompts, items, **options)(model)


def measurement(
    tokenizer,
    prompts: Sequence[str],
    items: Sequence[tuple[str, str, str]] | None = None,
    *,
    variants: Sequence[str] = VARIANTS,
    samples: int = 5,
    seed: int = 0,
    judge: str = "toy-exact",
):
    """The ``evaluate.Measurement`` that ``measure`` applies: the toy's settings, ``judge``
    ("toy-exact" or "keyword") with the other one second, the toy's utility task."""
    from .. import evaluate

    if judge not in ("toy-exact", "keyword"):
        raise ValueError(f"judge must be 'toy-exact' or 'keyword', got {judge!r}")
    first, second = ExactJudge(), evaluate.KeywordJudge()
    if judge == "keyword":
        first, second = second, first

    asr = {
        "prompts": list(prompts),
        "variants": list(variants),
        "suffixes": SUFFIXES if "adv_suffix" in variants else None,
        "judge": first,
        "samples": samples,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 128,
        "seed": seed,
    }
    utility = None if items is None else (lambda m: utility_accuracy(m, tokenizer, items))
    return evaluate.Measurement(tokenizer, asr, second_judge=second, utility=utility)
