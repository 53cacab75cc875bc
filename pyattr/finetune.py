"""Fine-tuning attacks with frozen weights (DESIGN.md, "frozen fine-tuning").

``finetune(model, tokenizer, pairs, frozen=mask)`` fine-tunes on (prompt, response) pairs, the
loss on response tokens as in calibration, while the entries ``frozen`` selects stay bit for bit
what they were:

- full fine-tuning: their gradients are zeroed as they are produced (no gradient, so Adam's
  moments for them stay zero), and after every optimizer step they are written back from a copy
  (so decoupled weight decay and any optimizer drift cannot move them either);
- LoRA (``lora_rank``, through peft): the adapters train as usual, then the merged update
  ``ΔW = B A`` is applied everywhere except the frozen entries.

The paper asks whether freezing the safety-critical weights keeps a fine-tuning attack from
undoing alignment; ``frozen=None`` is the plain attack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from .data import Example, encode_all
from .edit import layers_for
from .masks import Mask
from .models import input_device, max_length_for, pad_id
from .models import pad as pad_rows

__all__ = ["OPTIMIZERS", "finetune"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _batches(encoded, batch_size: int, steps: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        yield [encoded[i] for i in order[:batch_size]]
        del order[:batch_size]


def _loss(model, batch, pad: int, device) -> torch.Tensor:
    ids, attention = pad_rows([e.input_ids for e in batch], pad)
    targets = [torch.where(e.counted, e.input_ids, torch.tensor(-100)) for e in batch]
    labels, _ = pad_rows(targets, -100)
    out = model(input_ids=ids.to(device), attention_mask=attention.to(device))
    logits = out.logits[:, :-1].float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device)
    )


def finetune(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Example],
    *,
    frozen: Mask | None = None,
    steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    lora_rank: int | None = None,
    max_length: int | None = None,
    optimizer: str = "adamw",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune ``model`` in place; returns ``{"loss_first", "loss_last", "steps"}``.
    Pairs longer than ``max_length`` tokens (default: the model's context) are cut to it.
    ``optimizer``: "adamw" (the attacks of the literature), or "sgd" (plain steps
    proportional to the gradient, so that freezing a region removes, to first order, its share
    of the squared gradient rather than, as under Adam's sign-like first step, its share of the
    gradient's magnitude; its ``weight_decay`` is the coupled L2 of ``torch.optim.SGD``)."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no fine-tuning pairs")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps, batch_size >= 1 and lr > 0: {steps}, {batch_size}, {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    max_length = max_length_for(model, max_length)
    layers = layers_for(model, frozen) if frozen is not None else {}
    chosen = frozen.masks if frozen is not None else {}
    masks = {name: m.to(layers[name].weight.device) for name, m in chosen.items()}
    saved = {name: layers[name].weight.detach()[m].clone() for name, m in masks.items()}
    encoded = encode_all(tokenizer, pairs, max_length=max_length)
    pad, device = pad_id(tokenizer), input_device(model)
    torch.manual_seed(seed)
    trained = model
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    if lora_rank is not None:
        trained = _with_lora(model, lora_rank)
        params = [p for p in trained.parameters() if p.requires_grad]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        in_layout = {name: layers[name].relayout(m) for name, m in masks.items()}
        handles = [
            layers[name].module.weight.register_hook(lambda g, m=m: g.masked_fill(m, 0))
            for name, m in in_layout.items()
        ]
    step = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    trained.train()
    losses = []
    try:
        for batch in tqdm(
            _batches(encoded, batch_size, steps, seed),
            total=steps,
            desc="fine-tune",
            unit="step",
            disable=not progress,
        ):
            loss = _loss(trained, batch, pad, device)
            step.zero_grad(set_to_none=True)
            loss.backward()
            step.step()
            losses.append(float(loss.detach()))
            if lora_rank is None:
                _write_back(layers, masks, saved)
    finally:
        model.train(was_training)
        if lora_rank is None:
            for h in handles:
                h.remove()
    if lora_rank is not None:
        _merge(trained, model, layers, masks, saved)
        for name, p in model.named_parameters():  # peft froze the base weights
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    return {"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


@torch.no_grad()
def _write_back(layers, masks, saved) -> None:
    for name, m in masks.items():
        layers[name].weight[m] = saved[name]


def _with_lora(model: nn.Module, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(
            f"LoRA fine-tuning needs peft ({exc}): `pip install 'pyattr[finetune]'`"
        ) from None
    from .models import find_linear_layers

    suffixes = sorted({layer.name.rsplit(".", 1)[-1] for layer in find_linear_layers(model)})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=suffixes)
    return get_peft_model(model, config)


@torch.no_grad()
def _merge(trained, model: nn.Module, layers, masks, saved) -> None:
    """Fold the adapters into the weights, then put the frozen entries back."""
    trained.merge_and_unload()  # merges in place into ``model``'s modules
    _write_back(layers, masks, saved)
