"""Batched generation with Hugging Face ``generate``: left padding, KV cache, seeded sampling.

Prompts are sorted longest first and cut into batches (the largest batch shape comes first, so
running out of memory happens at once, not an hour in). Sampling is seeded per batch from
``(seed, batch index)`` inside a forked RNG: the same call gives the same text, a resumed run
regenerates a batch exactly, and the caller's RNG state is left alone. Sampling is plain
temperature sampling: ``top_p``/``top_k`` from the model's generation config are switched off.

At scale (``cache="static"``): a static KV cache, which transformers compiles the forward for on
a GPU (``compile=False`` turns that off); prompt widths are rounded up to a multiple of 64 so
that a handful of shapes is compiled, not one per batch (left padding changes no text; not
past the model's context).
``batch_size="auto"`` takes the largest batch whose KV cache, logits and prefill rows
(``pyattr.capacity.sequence_bytes``) fit in the free memory of the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..data import prompt_ids
from ..models import context_length, input_device, pad_id
from ..models import pad as pad_rows

__all__ = [
    "Generator",
    "HfGenerator",
    "auto_batch_size",
    "batches",
    "check_fits",
    "check_request",
    "generate",
    "generate_batches",
    "make_generator",
]


def batches(
    encoded: Sequence[Sequence[int]], batch_size: int, skip: frozenset[int] = frozenset()
) -> Iterator[tuple[int, list[int]]]:
    """``(batch index, prompt indices)``: longest prompts first, ties by index; ``skip`` drops
    batches by index without renumbering the others."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    for index, start in enumerate(range(0, len(order), batch_size)):
        if index not in skip:
            yield index, order[start : start + batch_size]


STATIC_WIDTH = 64  # prompt widths under a static cache: multiples of this (few compiled shapes)


def free_memory(device: torch.device) -> int:
    """Bytes free for generation on ``device``: CUDA's free memory, or the host's available
    memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume 8 GiB
        return 8 << 30


def auto_batch_size(
    model: nn.Module,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    free: int | None = None,
    share: float = 0.8,
) -> int:
    """The largest batch whose sequences (KV cache of the longest prompt plus
    ``max_new_tokens``, last-position logits, prefill rows; ``capacity.sequence_bytes``) fit
    in ``share`` of the ``free`` bytes (default: what the input device has free now), at least
    1 and at most the number of prompts."""
    from ..capacity import sequence_bytes

    if not encoded:
        raise ValueError("no prompts to generate from")
    dtype = next(model.parameters()).dtype
    longest = -(-max(len(e) for e in encoded) // STATIC_WIDTH) * STATIC_WIDTH
    per_sequence = sequence_bytes(model.config, dtype, longest, max_new_tokens)
    free = free_memory(input_device(model)) if free is None else free
    return max(1, min(len(encoded), int(free * share) // per_sequence))


def check_fits(model: nn.Module, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Raise, naming the longest prompt, when it and ``max_new_tokens`` overflow the context."""
    context = context_length(model)
    if context is None or not lengths:
        return
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[longest] + max_new_tokens > context:
        hint = (
            f"; lower max_new_tokens to at most {context - lengths[longest]}"
            if lengths[longest] < context
            else "; shorten the prompt"
        )
        raise ValueError(
            f"prompt {longest} has {lengths[longest]} tokens, and with max_new_tokens="
            f"{max_new_tokens} it exceeds the model's context of {context} tokens{hint}"
        )


def check_request(
    model: nn.Module,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    temperature: float,
) -> None:
    """The checks every generation backend makes before it starts."""
    if not encoded:
        raise ValueError("no prompts to generate from")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be >= 1: {batch_size}, {max_new_tokens}"
        )
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs a temperature > 0, got {temperature}")
    check_fits(model, [len(e) for e in encoded], max_new_tokens)


@torch.no_grad()
def generate_batches(
    model: nn.Module,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    skip: frozenset[int] = frozenset(),
    cache: str = "dynamic",
    compile: bool | None = None,
) -> Iterator[tuple[int, list[int], list[str]]]:
    """Yield ``(batch index, prompt indices, responses)`` batch by batch for token-id prompts;
    ``skip`` leaves out batches by index (a resumed run), without changing the others.
    ``batch_size``: a count or "auto" (``auto_batch_size``); ``cache``: "dynamic" or "static"
    (compiled on a GPU unless ``compile=False``; see the module's docstring)."""
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    if batch_size == "auto":
        if skip:
            raise ValueError(
                "batch_size='auto' cannot resume by batch index: resolve it once with "
                "auto_batch_size and pass the count"
            )
        batch_size = auto_batch_size(model, encoded, max_new_tokens) if encoded else 1
    check_request(model, encoded, max_new_tokens, batch_size, do_sample, temperature)
    pad = pad_id(tokenizer)
    device = input_device(model)
    options = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {}
    if cache == "static":
        options["cache_implementation"] = "static"
    if compile is False:
        options["disable_compile"] = True
    context = context_length(model)
    was_training = model.training
    model.eval()
    try:
        for index, chunk in batches(encoded, batch_size, skip):
            rows = [list(encoded[i]) for i in chunk]
            multiple = 1
            if cache == "static":  # rounded up, unless that overflows the context
                wide = -(-max(len(r) for r in rows) // STATIC_WIDTH) * STATIC_WIDTH
                multiple = (
                    STATIC_WIDTH if context is None or wide + max_new_tokens <= context else 1
                )
            ids, attention = pad_rows(rows, pad, left=True, multiple=multiple)
            width = ids.shape[1]
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed * 1_000_003 + index)
                result = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    do_sample=do_sample,
                    **options,
                )
            texts = tokenizer.batch_decode(result[:, width:], skip_special_tokens=True)
            yield index, chunk, [t.strip() for t in texts]
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    system_prompt: str | None = None,
    wrapped: bool | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    cache: str = "dynamic",
    compile: bool | None = None,
) -> list[str]:
    """The model's response to each prompt (chat-formatted as in calibration), decoded without
    special tokens. Greedy by default; ``do_sample`` samples at ``temperature``, seeded;
    ``batch_size``, ``cache``, ``compile``: as ``generate_batches``."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    encoded = [prompt_ids(tokenizer, p, system_prompt, wrapped) for p in prompts]
    out = [""] * len(prompts)
    for _, indices, texts in generate_batches(
        model,
        tokenizer,
        encoded,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        cache=cache,
        compile=compile,
    ):
        for i, text in zip(indices, texts, strict=True):
            out[i] = text
    return out


@runtime_checkable
class Generator(Protocol):
    """A generation backend for ``attack_success`` (like ``Judge`` for verdicts): ``batches``
    yields ``(batch index, prompt indices, responses)`` for token-id prompts in the batches of
    ``batches()`` (longest first), seeded per batch, leaving out the batches in ``skip``;
    ``close`` frees what it holds. ``name`` goes into result files."""

    name: str

    def batches(
        self,
        encoded: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        batch_size: int,
        do_sample: bool,
        temperature: float,
        seed: int,
        skip: frozenset[int],
    ) -> Iterator[tuple[int, list[int], list[str]]]: ...

    def close(self) -> None: ...


class HfGenerator:
    """Hugging Face ``generate`` on the model in memory (``generate_batches``); ``cache`` and
    ``compile`` as there (a static, compiled KV cache on a GPU)."""

    name = "hf"

    def __init__(
        self, model: nn.Module, tokenizer, *, cache: str = "dynamic", compile: bool | None = None
    ) -> None:
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
        self.model, self.tokenizer = model, tokenizer
        self.options = {"cache": cache, "compile": compile}

    def batches(self, encoded, **options) -> Iterator[tuple[int, list[int], list[str]]]:
        return generate_batches(self.model, self.tokenizer, encoded, **(self.options | options))

    def close(self) -> None:
        """Nothing to free: the model belongs to the caller."""


def make_generator(
    backend: str,
    model: nn.Module,
    tokenizer,
    vllm_options: dict | None = None,
    hf_options: dict | None = None,
) -> Generator:
    """The named backend: "hf" (with ``hf_options`` for ``HfGenerator``: cache, compile) or
    "vllm" (with ``vllm_options`` for ``vllm.LLM``)."""
    if backend == "vllm":
        from .vllm_backend import VllmEngine

        return VllmEngine(model, tokenizer, **(vllm_options or {}))
    if backend == "hf":
        return HfGenerator(model, tokenizer, **(hf_options or {}))
    raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
