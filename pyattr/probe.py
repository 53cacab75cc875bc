"""Head probing (the paper's Appendix B.4): which attention heads tell harmful from harmless.

Each head's output at the last prompt token (the slice of the attention output projection's
input that belongs to the head, before the projection mixes heads) is one feature vector; a
linear probe per head, L2-regularised logistic regression on standardised features fitted by
Newton's method for all heads at once (deterministic: no sampling, no learning rate), is trained
on a stratified split and scored by its accuracy on the held-out part. The paper's code for this
was never released and its split is not recoverable from the text: the held-out share
(``test_fraction``, 0.3) and the regularisation are pyattr's.

``head_region`` turns the top heads into a weight region (the columns of the output projection
that read them) for pruning through the edit registry: removing a head is zeroing them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .direction import residual_writers
from .io import atomic_write
from .masks import Mask
from .models import decoder_blocks, find_linear_layers, input_device, pad, pad_id

__all__ = [
    "HeadProbe",
    "attention_outputs",
    "fit_probes",
    "head_features",
    "head_region",
    "plot_probe",
    "probe_heads",
    "prompt_batches",
]


def _heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(model).__name__}'s config names no number of attention heads")


def attention_outputs(model: nn.Module) -> list[str]:
    """Per block, the layer that projects the concatenated head outputs into the stream: the
    first residual writer of each block (o_proj, GPT-2's c_proj in attn, NeoX's dense)."""
    writers = residual_writers(model)
    by_name = {layer.name: layer for layer in find_linear_layers(model)}
    _, blocks = decoder_blocks(model)
    first: dict[int, str] = {}
    for name in writers:
        first.setdefault(by_name[name].block, name)
    if len(first) != len(blocks):
        raise ValueError("could not find the attention output projection of every block")
    return [first[i] for i in range(len(blocks))]


def prompt_batches(
    tokenizer,
    prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> Iterable[dict]:
    """Model inputs of the prompts in the chat format, left-padded (position −1 is each prompt's
    last token), ``batch_size`` at a time."""
    from .data import prompt_ids

    if not prompts:
        raise ValueError("no prompts")
    encoded = [prompt_ids(tokenizer, p, system_prompt, wrapped=False) for p in prompts]
    for start in range(0, len(encoded), batch_size):
        ids, attention = pad(encoded[start : start + batch_size], pad_id(tokenizer, 0), left=True)
        yield {"input_ids": ids, "attention_mask": attention}


@torch.no_grad()
def head_features(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """(N, L, H, head_dim) float32: every head's output at position −1 of each input, for
    batches of model keyword arguments (``input_ids``/``attention_mask`` left-padded, or
    ``inputs_embeds``)."""
    names = attention_outputs(model)
    modules = dict(model.named_modules())
    heads = _heads(model)
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    for name in names:
        if layers[name].d_in % heads:
            raise ValueError(
                f"{name} reads {layers[name].d_in} features, not a multiple of {heads}"
            )
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for index, name in enumerate(names):

        def hook(_module, args, index=index):
            seen[index] = args[0][:, -1, :].detach().float().cpu()

        handles.append(modules[name].register_forward_pre_hook(hook))
    device = input_device(model)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            seen.clear()
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            stacked = torch.stack([seen[i] for i in range(len(names))], 1)  # (B, L, H·d)
            rows.append(stacked.view(stacked.shape[0], len(names), heads, -1))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not rows:
        raise ValueError("no inputs to probe")
    return torch.cat(rows)


def _split(n_pos: int, n_neg: int, test_fraction: float, seed: int) -> tuple[list, list]:
    """Stratified train/test indices into the concatenation [positives, negatives]."""
    rng = random.Random(seed)
    train, test = [], []
    for offset, n in ((0, n_pos), (n_pos, n_neg)):
        order = list(range(offset, offset + n))
        rng.shuffle(order)
        k = max(1, round(test_fraction * n))
        if n - k < 1:
            raise ValueError(f"a class has {n} examples: too few to hold {k} out and train")
        test += order[:k]
        train += order[k:]
    return sorted(train), sorted(test)


def fit_probes(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, iterations: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression for G problems at once: x (G, n, d), y (n,) in {0, 1}. Minimises
    ``mean log(1 + exp(−s·(w·x + b))) + l2/2 ‖w‖²`` (s = ±1) by Newton's method in float64.
    Returns (w (G, d), b (G,))."""
    if x.dim() != 3 or y.shape != (x.shape[1],):
        raise ValueError(f"x must be (G, n, d) and y (n,), got {tuple(x.shape)}, {tuple(y.shape)}")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (separable data has no finite optimum), got {l2}")
    g, n, d = x.shape
    xb = torch.cat([x.double(), torch.ones(g, n, 1, dtype=torch.float64)], 2)
    s = y.double() * 2 - 1
    theta = torch.zeros(g, d + 1, dtype=torch.float64)
    ridge = torch.full((d + 1,), l2, dtype=torch.float64)
    ridge[-1] = 1e-8  # the bias is (almost) not regularised
    for _ in range(iterations):
        margin = s * torch.einsum("gnd,gd->gn", xb, theta)
        p = torch.sigmoid(-margin)  # the loss's slope at each sample
        grad = -torch.einsum("gn,gnd->gd", p * s, xb) / n + ridge * theta
        weight = p * (1 - p) / n
        hessian = torch.einsum("gn,gnd,gne->gde", weight, xb, xb) + torch.diag(ridge)
        theta = theta - torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
    return theta[:, :-1], theta[:, -1]


@dataclass
class HeadProbe:
    """accuracy: (L, H) held-out accuracy of each head's probe; train_accuracy: the same on the
    training part; n_train, n_test: examples; settings."""

    accuracy: torch.Tensor
    train_accuracy: torch.Tensor
    n_train: int
    n_test: int
    settings: dict

    def top(self, k: int) -> list[tuple[int, int]]:
        """The k heads (layer, head) of highest held-out accuracy; ties to the lower layer, then
        the lower head (the order of ``accuracy.flatten()``)."""
        flat = self.accuracy.flatten()
        if not 0 <= k <= flat.numel():
            raise ValueError(f"k must be in [0, {flat.numel()}], got {k}")
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        heads = self.accuracy.shape[1]
        return [(i // heads, i % heads) for i in order]

    def save(self, path: str | Path) -> Path:
        """As JSON (accuracies, counts, settings), atomically."""
        import json

        payload = {
            "format": "pyattr.probe/1",
            "accuracy": self.accuracy.tolist(),
            "train_accuracy": self.train_accuracy.tolist(),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "settings": self.settings,
        }
        return atomic_write(Path(path), (json.dumps(payload, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> HeadProbe:
        """Read what ``save`` wrote."""
        import json

        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != "pyattr.probe/1":
            raise ValueError(f"{path} is not a head probe written by pyattr probe")
        return cls(
            torch.tensor(payload["accuracy"], dtype=torch.float64),
            torch.tensor(payload["train_accuracy"], dtype=torch.float64),
            payload["n_train"],
            payload["n_test"],
            payload["settings"],
        )

    def rows(self) -> list[dict]:
        """One row per head: layer, head, accuracy, train_accuracy, rank (1 = best)."""
        ranked = {h: i + 1 for i, h in enumerate(self.top(self.accuracy.numel()))}
        return [
            {
                "layer": layer,
                "head": head,
                "accuracy": round(float(self.accuracy[layer, head]), 4),
                "train_accuracy": round(float(self.train_accuracy[layer, head]), 4),
                "rank": ranked[(layer, head)],
            }
            for layer in range(self.accuracy.shape[0])
            for head in range(self.accuracy.shape[1])
        ]


def probe_heads(
    harmful: torch.Tensor,
    harmless: torch.Tensor,
    *,
    test_fraction: float = 0.3,
    l2: float = 1e-2,
    seed: int = 0,
) -> HeadProbe:
    """Probe each head: ``harmful`` (N₁, L, H, d) and ``harmless`` (N₀, L, H, d) features from
    ``head_features``; a stratified, seeded split holds ``test_fraction`` of each class out.
    Features are standardised with the training part's mean and deviation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if harmful.dim() != 4 or harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(
            f"features must be (N, L, H, d) alike, got {tuple(harmful.shape)} and "
            f"{tuple(harmless.shape)}"
        )
    for name, t in (("harmful", harmful), ("harmless", harmless)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the {name} features hold NaN or Inf")
    _, layers, heads, d = harmful.shape
    x = torch.cat([harmful, harmless]).double().reshape(-1, layers * heads, d).transpose(0, 1)
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
    train, test = _split(len(harmful), len(harmless), test_fraction, seed)
    mean = x[:, train].mean(1, keepdim=True)
    std = x[:, train].std(1, keepdim=True).clamp_min(1e-8)
    z = (x - mean) / std
    w, b = fit_probes(z[:, train], y[train], l2=l2)

    def accuracy(index: list[int]) -> torch.Tensor:
        logits = torch.einsum("gnd,gd->gn", z[:, index], w) + b[:, None]
        return ((logits > 0).double() == y[index]).double().mean(1).view(layers, heads)

    settings = {"test_fraction": test_fraction, "l2": l2, "seed": seed}
    return HeadProbe(accuracy(test), accuracy(train), len(train), len(test), settings)


def head_region(model: nn.Module, heads: Sequence[tuple[int, int]]) -> Mask:
    """The weights that read the given (layer, head)s: their columns of each block's attention
    output projection. Pruning this mask removes the heads."""
    names = attention_outputs(model)
    count = _heads(model)
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    masks = {}
    for name in names:
        layer = layers[name]
        masks[name] = torch.zeros(layer.d_out, layer.d_in, dtype=torch.bool, device="cpu")
    for block, head in heads:
        if not (0 <= block < len(names) and 0 <= head < count):
            raise ValueError(f"no head ({block}, {head}): {len(names)} blocks of {count} heads")
        width = layers[names[block]].d_in // count
        masks[names[block]][:, head * width : (head + 1) * width] = True
    return Mask(masks)


def plot_probe(probe: HeadProbe, path: str | Path, *, title: str = "") -> Path:
    """A blocks × heads heat map of held-out probe accuracy, chance (0.5) marked on the colour
    bar, as a PNG, atomically."""
    from ._plot import pyplot, save_png

    plt = pyplot()
    acc = probe.accuracy.numpy()
    layers, heads = acc.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * heads + 3), max(3.0, 0.25 * layers + 1.5)))
    image = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("decoder block")
    if layers * heads <= 64:
        for i in range(layers):
            for j in range(heads):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7, c="w")
    bar = fig.colorbar(image, ax=ax, label="held-out probe accuracy (chance 0.5)")
    bar.ax.axhline(0.5, color="red", linewidth=1.5)
    ax.set_title(
        title or f"head probes: harmful vs harmless ({probe.n_test} held out)", fontsize=10
    )
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
