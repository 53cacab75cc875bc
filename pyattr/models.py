"""Find the linear layers of any Hugging Face decoder-only model, by structure.

The decoder blocks are the model's largest ``nn.ModuleList`` whose entries are all of one class
(``model.layers`` in Llama, ``transformer.h`` in GPT-2, ``gpt_neox.layers``, ...); every
``nn.Linear`` and GPT-2 ``Conv1D`` inside them is a layer. ``lm_head`` and the embeddings lie
outside the blocks and so are excluded. No module name is hard-coded.

Layers that read the same input tensor (q/k/v, gate/up; OPT's k/v/q) form one *input group*:
their activation statistics are identical, so calibration keeps one accumulator per group.
Groups are found by a probe: one forward pass of two tokens with hooks that record which tensor
object each layer received.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .io import all_finite

__all__ = [
    "LinearLayer",
    "check_finite",
    "context_length",
    "decoder_blocks",
    "find_linear_layers",
    "input_device",
    "input_groups",
    "layers_by_name",
    "max_length_for",
    "pad",
    "pad_id",
    "resident_device",
]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@dataclass(frozen=True)
class LinearLayer:
    """One linear map y = x Wᵀ (+ b) inside a decoder block.

    name: the module's path (``model.layers.3.mlp.down_proj``); block: the block's index;
    transposed: the module stores Wᵀ (GPT-2's Conv1D, weight (d_in, d_out)).
    """

    name: str
    module: nn.Module
    block: int
    transposed: bool

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    @property
    def weight(self) -> torch.Tensor:
        """W as (d_out, d_in), a view of the module's parameter (transposed for Conv1D)."""
        return self.relayout(self.module.weight)

    def relayout(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the parameter's shape as (d_out, d_in), or one of (d_out, d_in) as the
        parameter's layout: the same view both ways (a transpose for Conv1D, else itself).
        Gradients, masks and statistics cross between the two layouts only here."""
        return t.T if self.transposed else t


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's decoder blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None or best[0] == 0:
        raise ValueError(
            f"no decoder blocks found in {type(model).__name__}: expected an nn.ModuleList of "
            "identical blocks holding the model's parameters"
        )
    return best[1], best[2]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(re.search(p, name) for p in patterns)


def find_linear_layers(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[LinearLayer]:
    """Every linear layer inside the decoder blocks, in module order.

    include/exclude: regular expressions searched in the layer's full name (``include=None``
    keeps every layer; ``exclude`` is applied after ``include``), e.g. ``exclude=[r"\\.mlp\\."]``.
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else None
    prefix, blocks = decoder_blocks(model)
    conv1d = _conv1d_type()
    layers = []
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            transposed = conv1d is not None and isinstance(module, conv1d)
            if not (isinstance(module, nn.Linear) or transposed):
                continue
            name = f"{prefix}.{index}.{sub}" if prefix else f"{index}.{sub}"
            if include is not None and not _matches(name, include):
                continue
            if _matches(name, exclude):
                continue
            layers.append(LinearLayer(name, module, index, transposed))
    if not layers:
        raise ValueError(
            f"no linear layers found in the decoder blocks '{prefix}' of {type(model).__name__}"
            f" (include={include}, exclude={exclude})"
        )
    return layers


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the embeddings' device, or, for embeddings offloaded by
    accelerate (a meta placeholder), the device their hook executes on."""
    embeddings = model.get_input_embeddings()
    return resident_device(embeddings, embeddings.weight)


def resident_device(module: nn.Module, tensor: torch.Tensor) -> torch.device:
    """``tensor``'s device, or where accelerate's hook on ``module`` runs it when the tensor is
    an offloaded meta placeholder."""
    if tensor.device.type == "meta":
        execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    return tensor.device


@torch.no_grad()
def input_groups(model: nn.Module, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Partition ``layers`` into groups that read the same input tensor, in module order.

    Runs one forward pass of two tokens (ids 0 and 1) on the device of the input embeddings.
    Layers the probe does not reach (unused branches) form groups of their own.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(_module, args, name=layer.name):
            if args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0]

        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        model(input_ids=torch.tensor([[0, 1]], device=input_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[LinearLayer]] = {}
    for layer in layers:
        key = id(seen[layer.name]) if layer.name in seen else id(layer)
        groups.setdefault(key, []).append(layer)
    return list(groups.values())


def layers_by_name(
    model: nn.Module, layers: Iterable[LinearLayer] | None = None
) -> dict[str, LinearLayer]:
    """``{name: layer}`` for ``layers`` (default: every linear layer of the model)."""
    return {
        layer.name: layer for layer in (layers if layers is not None else find_linear_layers(model))
    }


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, from its config (None if it has none)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_finite(model: nn.Module, where: str = "the model") -> None:
    """Refuse a model whose weights hold NaN or Inf, naming the first such parameter: its
    statistics would be NaN and its generations garbage that a judge counts as jailbreaks.
    One pass over the weights (parameters offloaded to the meta device are skipped)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type != "meta" and not all_finite(param):
                bad = int((~torch.isfinite(param)).sum())
                raise ValueError(
                    f"{where} has {bad} NaN/Inf values in {name}; refusing to compute anything "
                    "from it"
                )


def max_length_for(model: nn.Module, max_length: int | None) -> int | None:
    """The model's context by default; an explicit length must be at least 2 tokens and fit
    the context (longer sequences would index past the position embeddings)."""
    context = context_length(model)
    if max_length is None:
        return context
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {context} tokens")
    return max_length


def pad_id(tokenizer, fallback: int | None = None) -> int:
    """The pad token, or EOS for tokenizers that have none (Llama's): under an attention mask
    the pad id never reaches the model's output. With neither, ``fallback`` (when given: any id
    serves where padding is masked out everywhere) or an error."""
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if value is not None:
            return value
    if fallback is not None:
        return fallback
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


def pad(
    rows: Sequence[Sequence[int] | torch.Tensor],
    value: int | bool,
    *,
    left: bool = False,
    dtype: torch.dtype = torch.long,
    multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ``rows`` padded with ``value`` to the longest (rounded up to a ``multiple``), on
    the right (or the ``left``: generation), and the (B, L) long mask that is 1 on real entries
    (the attention mask)."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        span = slice(width - n, width) if left else slice(0, n)
        out[i, span] = torch.as_tensor(row, dtype=dtype)
        mask[i, span] = 1
    return out, mask
