"""KL divergence on harmless prompts: the cheap utility signal of direction edits.

``KL(P_original ‖ P_edited)`` of the next-token distribution, averaged over the scored positions
of a prompt set (chat format): the last prompt token (where the response begins; the default, as
in Arditi et al.) or every prompt token. The original model's log-probabilities are taken once
(``next_token_logprobs``, kept on the CPU in float32) and every edited model is compared with
them, so the original need not stay in memory beside the edited one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..data import prompt_ids
from ..models import input_device, pad, pad_id

__all__ = ["Reference", "harmless_kl", "next_token_logprobs"]


@dataclass
class Reference:
    """The original model's log-probabilities: ``logprobs[i]`` (positions, vocab) float32 for
    prompt i; the settings they were taken with, which a comparison must match."""

    logprobs: list[torch.Tensor]
    positions: str
    system_prompt: str | None
    prompts: int


def _logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    positions: str,
    system_prompt: str | None,
    batch_size: int,
) -> list[torch.Tensor]:
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    if not prompts:
        raise ValueError("no prompts for the KL divergence")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [prompt_ids(tokenizer, p, system_prompt, wrapped=False) for p in prompts]
    device = input_device(model)
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                ids, attention = pad(chunk, pad_id(tokenizer, 0), left=True)
                logits = model(
                    input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
                ).logits
                for b, row in enumerate(chunk):
                    keep = logits[b, -1:] if positions == "last" else logits[b, -len(row) :]
                    out.append(keep.float().log_softmax(-1).cpu())
    finally:
        model.train(was_training)
    return out


def next_token_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    positions: Literal["last", "all"] = "last",
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> Reference:
    """The reference for ``harmless_kl``: the (original) model's next-token log-probabilities
    at the last prompt token or every prompt token of each prompt."""
    logprobs = _logprobs(model, tokenizer, list(prompts), positions, system_prompt, batch_size)
    return Reference(logprobs, positions, system_prompt, len(logprobs))


def harmless_kl(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    reference: Reference,
    *,
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> float:
    """Mean over the scored positions of ``KL(reference ‖ model)`` (nats), on the same prompts
    and settings the reference was taken with (checked)."""
    prompts = list(prompts)
    if len(prompts) != reference.prompts:
        raise ValueError(
            f"the reference holds {reference.prompts} prompts, {len(prompts)} were given"
        )
    if (system_prompt or None) != (reference.system_prompt or None):
        raise ValueError("the reference was taken with another system prompt")
    edited = _logprobs(model, tokenizer, prompts, reference.positions, system_prompt, batch_size)
    total, count = 0.0, 0
    for p, q in zip(reference.logprobs, edited, strict=True):
        if p.shape != q.shape:
            raise ValueError(
                f"the reference has shape {tuple(p.shape)}, the model {tuple(q.shape)}"
            )
        p64, q64 = p.double(), q.double()
        total += float((p64.exp() * (p64 - q64)).sum())
        count += p.shape[0]
    return total / count
