"""Perplexity of a text with a sliding window (DESIGN.md, "utility").

The text is tokenized once (with BOS when the tokenizer adds one) and scored in windows of at
most ``window`` tokens that start every ``stride`` tokens: each window predicts only the tokens
no earlier window predicted, with at least ``window - stride`` tokens of context, so with
``stride < window`` every token after the first is predicted exactly once. ``stride == window``
is plain chunking (each chunk's first token goes unpredicted); a window as long as the text is
one forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..models import context_length, input_device

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
) -> float:
    """exp(mean negative log-likelihood per predicted token) of ``text`` (a string, or a path to
    a text file). window: defaults to the model's context length; stride: to half the window."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if window is None:
        window = context_length(model) or 1024
    stride = stride if stride is not None else max(1, window // 2)
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need 2 <= window and 1 <= stride <= window, got {window}, {stride}")
    device = input_device(model)
    was_training = model.training
    model.eval()
    nll, count, done = 0.0, 0, 0  # tokens [0, done) are predicted already (or are the first)
    try:
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            chunk = ids[begin:end].to(device)
            logits = model(input_ids=chunk[None], use_cache=False).logits[0, :-1]
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()  # the loss in at least fp32, never below the model's
            first = max(done - begin, 1)  # the chunk's first token not yet predicted
            nll += float(
                nn.functional.cross_entropy(logits[first - 1 :], chunk[first:], reduction="sum")
            )
            count += end - begin - first
            done = end
            if end == len(ids):
                break
    finally:
        model.train(was_training)
    return math.exp(nll / count)
