"""The refusal direction: one vector of the residual stream that mediates refusal.

Difference of means (Arditi et al., 2024): per decoder block ``l`` and position ``i`` (the last
``P`` tokens: by default the chat template's tokens after the instruction and, where the two
sets' responses open alike, those shared opening tokens, teacher-forced; a deviation from
Arditi et al., who use the template tokens only, for models that decide after the opening),
``r[l, i] = mean_harmful h_l[i] − mean_harmless h_l[i]``, ``h_l`` the residual stream at the
input of block ``l``. One streaming pass per prompt set, hooks on the blocks; the sums are kept
in float64.

A candidate is judged on held-out prompts by the criteria of that paper:

    bypass   mean refusal score of harmful prompts with ``r̂`` ablated everywhere (lower: the
             direction carries refusal)
    induce   mean refusal score of harmless prompts with ``r`` added at block ``l`` (above
             ``induce_threshold``: adding it makes the model refuse)
    kl       mean KL(original ‖ ablated) of the next token on harmless prompts (below
             ``kl_threshold``: ablation leaves ordinary prompts alone)

and candidates in the last ``1 − max_layer_fraction`` of the blocks are skipped (close to the
unembedding a direction predicts tokens, not a decision). The lowest bypass score among the
candidates left is chosen.

Refusal score: ``log P(refuse) − log(1 − P(refuse))`` at the start of the response, with
``P(refuse)`` the probability of the response opening with one of the *refusal prefixes*.
Arditi et al. use the first token; pyattr takes, for each refusal of the safety set, its
shortest opening (at most ``max_prefix`` tokens) that no answer of the utility set opens with,
so a model whose refusals and answers begin with the same word ("I cannot" / "I can") is
scored on the word where they part. With one-token prefixes the two definitions agree.

Edits: ``ablated`` (hooks: ``h ← h − r̂ r̂ᵀ h`` on every block's input and the last block's
output: the residual stream never holds ``r̂``), ``orthogonalize`` (the same, in the weights:
every matrix writing to the residual stream, embeddings included, projected in place as
``W − r̂ (r̂ᵀ W)``), ``added`` (``h ← h + c·r`` at one block, every position). For models that
normalise a block's writes before adding them (Gemma 2/3's post-norms), projecting the writers
does not keep ``r̂`` out of the stream; ``orthogonalize`` checks the stream after the edit and
refuses such a model (use ``ablated``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import Example, encode, prompt_ids
from .io import load_tensors, save_tensors
from .models import decoder_blocks, find_linear_layers, input_device, pad, pad_id

__all__ = [
    "Candidate",
    "RefusalDirections",
    "Selection",
    "ablated",
    "added",
    "find_directions",
    "load_directions",
    "load_selection",
    "orthogonalize",
    "plot_selection",
    "post_instruction_length",
    "random_direction",
    "refusal_direction",
    "refusal_prefixes",
    "refusal_scores",
    "residual_writers",
    "select_direction",
    "shared_opening",
]

FORMAT = "pyattr.direction/1"


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"no {what} prompts")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{what} prompt {bad[0]} is empty or not text")
    return prompts


def post_instruction_length(tokenizer, system_prompt: str | None = None, cap: int = 8) -> int:
    """How many tokens the prompt format puts after the instruction (``[/INST]``, an assistant
    header): the common ending of two formatted prompts with different last words, at least 1
    and at most ``cap``."""
    a = prompt_ids(tokenizer, "alpha beta", system_prompt, wrapped=False)
    b = prompt_ids(tokenizer, "gamma delta", system_prompt, wrapped=False)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return max(1, min(n, cap))


def _encoded(tokenizer, prompts: Sequence[str], system_prompt: str | None) -> list[list[int]]:
    return [prompt_ids(tokenizer, p, system_prompt, wrapped=False) for p in prompts]


def _batches(
    encoded: Sequence[Sequence[int]], batch_size: int, pad_value: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, ids, attention) left-padded: position −1 is every prompt's last token."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(encoded), batch_size):
        chunk = list(range(start, min(start + batch_size, len(encoded))))
        ids, attention = pad([encoded[i] for i in chunk], pad_value, left=True)
        yield chunk, ids, attention


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The block's hidden-state input and whether it came positionally."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], False
    raise RuntimeError("a decoder block was called without a hidden-state tensor")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, positional: bool):
    if positional:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class RefusalDirections:
    """Mean residual activations of both prompt sets per block and position.

    harmful, harmless: (L, P, d) float64, the means at the input of each of the L blocks over
    the last P prompt tokens (``positions``: −P … −1); n_harmful, n_harmless: prompts averaged.
    """

    harmful: torch.Tensor
    harmless: torch.Tensor
    positions: tuple[int, ...]
    n_harmful: int
    n_harmless: int
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.harmful.shape[0]

    def direction(self, layer: int, position: int = -1) -> torch.Tensor:
        """r = mean harmful − mean harmless at the input of ``layer``, (d,) float64."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer must be in [0, {self.layers}), got {layer}")
        if position not in self.positions:
            raise ValueError(f"position must be one of {list(self.positions)}, got {position}")
        i = self.positions.index(position)
        return self.harmful[layer, i] - self.harmless[layer, i]

    def save(self, path: str | Path) -> Path:
        """Write both means as safetensors (atomically), positions and counts in the header."""
        meta = {
            "positions": ",".join(str(p) for p in self.positions),
            "n_harmful": str(self.n_harmful),
            "n_harmless": str(self.n_harmless),
            **{k: str(v) for k, v in self.meta.items()},
        }
        tensors = {"harmful": self.harmful, "harmless": self.harmless}
        return save_tensors(tensors, path, format=FORMAT, metadata=meta)


def load_directions(path: str | Path) -> RefusalDirections:
    """Read what ``RefusalDirections.save`` wrote."""
    tensors, meta = load_tensors(path, FORMAT)
    skip = {"positions", "n_harmful", "n_harmless", "format"}
    return RefusalDirections(
        tensors["harmful"],
        tensors["harmless"],
        tuple(int(p) for p in meta["positions"].split(",")),
        int(meta["n_harmful"]),
        int(meta["n_harmless"]),
        {k: v for k, v in meta.items() if k not in skip},
    )


@torch.no_grad()
def _mean_residuals(
    model: nn.Module,
    encoded: list[list[int]],
    positions: int,
    batch_size: int,
    pad_value: int,
    bar,
) -> torch.Tensor:
    """(L, P, d) float64 mean of each block's input over the prompts' last P tokens."""
    _, blocks = decoder_blocks(model)
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []
    for index, block in enumerate(blocks):

        def hook(_module, args, kwargs, index=index):
            hidden, _ = _hidden_of(args, kwargs)
            part = hidden[:, -positions:, :].detach().to(torch.float64).sum(0).cpu()
            sums[index] = part if sums[index] is None else sums[index] + part

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    device = input_device(model)
    try:
        for chunk, ids, attention in _batches(encoded, batch_size, pad_value):
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([s / len(encoded) for s in sums])


def shared_opening(tokenizer, responses: Sequence[Example], cap: int = 4) -> list[int]:
    """The response tokens every one of ``responses`` opens with (at most ``cap``): where the
    two sets' responses have not parted yet, the decision to refuse is still ahead."""
    openings = []
    for example in responses:
        e = encode(tokenizer, example, eos=False)
        openings.append(e.input_ids[e.counted].tolist()[:cap])
    if not openings:
        return []
    common = openings[0]
    for ids in openings[1:]:
        n = 0
        while n < min(len(common), len(ids)) and common[n] == ids[n]:
            n += 1
        common = common[:n]
    return common


def find_directions(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: int | None = None,
    opening: Sequence[int] = (),
    system_prompt: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalDirections:
    """The means of both prompt sets (chat format, ``system_prompt`` or none) at every block's
    input over the last ``positions`` tokens (the template's post-instruction tokens, by
    default, plus the ``opening``): one forward pass per prompt, no generation. ``opening``:
    response tokens appended to every prompt (teacher-forced), those both sets' responses open
    with (``shared_opening``): a model whose refusals and answers begin alike ("I cannot" /
    "I can") decides after them, and the direction is looked for there too."""
    from tqdm.auto import tqdm

    harmful = _check_prompts(harmful, "harmful")
    harmless = _check_prompts(harmless, "harmless")
    opening = [int(t) for t in opening]
    p = positions
    if p is None:
        p = post_instruction_length(tokenizer, system_prompt) + len(opening)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"positions must be an int >= 1, got {p!r}")
    sets = [
        [e + opening for e in _encoded(tokenizer, s, system_prompt)] for s in (harmful, harmless)
    ]
    shortest = min(len(e) for s in sets for e in s)
    if shortest < p:
        raise ValueError(f"a prompt has {shortest} tokens, fewer than positions={p}")
    pad_value = pad_id(tokenizer, fallback=0)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=len(harmful) + len(harmless),
        desc="refusal direction",
        unit="prompt",
        disable=not progress,
    )
    try:
        means = [_mean_residuals(model, e, p, batch_size, pad_value, bar) for e in sets]
    finally:
        bar.close()
        model.train(was_training)
    meta = {"system_prompt": system_prompt or "", "opening": ",".join(map(str, opening))}
    return RefusalDirections(
        means[0], means[1], tuple(range(-p, 0)), len(harmful), len(harmless), meta
    )


# ----------------------------------------------------------------------------------------------
# Edits


def _unit(direction: torch.Tensor) -> torch.Tensor:
    if direction.dim() != 1:
        raise ValueError(f"a direction is a (d,) vector, got shape {tuple(direction.shape)}")
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("the direction holds NaN or Inf")
    norm = float(direction.double().norm())
    if norm == 0.0:
        raise ValueError("the direction is zero")
    return direction.double() / norm


def _check_width(model: nn.Module, direction: torch.Tensor) -> None:
    width = model.get_input_embeddings().weight.shape[1]
    if direction.shape[0] != width:
        raise ValueError(
            f"the direction has {direction.shape[0]} entries, the model's stream {width}"
        )


def _project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ u).unsqueeze(-1) * u


@contextlib.contextmanager
def ablated(model: nn.Module, direction: torch.Tensor) -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs with ``r̂`` projected out of its residual stream: out of
    every block's input, every write to the stream (``residual_writers``: so the stream between
    a block's attention and its MLP is clean too) and the last block's output (so the final
    norm never sees it)."""
    _check_width(model, direction)
    unit = _unit(direction)
    _, blocks = decoder_blocks(model)

    def pre(_module, args, kwargs):
        hidden, positional = _hidden_of(args, kwargs)
        return _with_hidden(args, kwargs, _project_out(hidden, unit), positional)

    def post(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return _project_out(output, unit)
        return (_project_out(output[0], unit), *output[1:])

    modules = dict(model.named_modules())
    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [modules[name].register_forward_hook(post) for name in residual_writers(model)]
    handles.append(blocks[-1].register_forward_hook(post))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def added(
    model: nn.Module, vector: torch.Tensor, layer: int, coefficient: float = 1.0
) -> Iterator[nn.Module]:
    """Inside the block, ``coefficient · vector`` is added to the input of block ``layer`` at
    every position (activation addition: with the refusal direction, it should induce
    refusal)."""
    _check_width(model, vector)
    _, blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be in [0, {len(blocks)}), got {layer}")
    if not math.isfinite(coefficient):
        raise ValueError(f"coefficient must be finite, got {coefficient}")
    shift = coefficient * vector.double()

    def pre(_module, args, kwargs):
        hidden, positional = _hidden_of(args, kwargs)
        moved = hidden + shift.to(device=hidden.device, dtype=hidden.dtype)
        return _with_hidden(args, kwargs, moved, positional)

    handle = blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def residual_writers(model: nn.Module) -> list[str]:
    """The linear layers whose outputs are added to the residual stream: for each child module
    of a block (attention, MLP; OPT's fc2), the last linear layer it calls, when its output has
    the stream's width (o_proj, down_proj, GPT-2's c_proj, NeoX's dense). The call order comes
    from a probe of two tokens (Phi-3 declares o_proj before qkv_proj but calls it last)."""
    width = model.get_input_embeddings().weight.shape[1]
    prefix, blocks = decoder_blocks(model)
    layers = find_linear_layers(model)
    called: list[str] = []
    handles = [
        layer.module.register_forward_hook(lambda *_, name=layer.name: called.append(name))
        for layer in layers
    ]
    try:
        model(input_ids=torch.tensor([[0, 1]], device=input_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    order = {name: i for i, name in reversed(list(enumerate(called)))}
    by_name = {layer.name: layer for layer in layers}
    writers = []
    for index, block in enumerate(blocks):
        base = f"{prefix}.{index}." if prefix else f"{index}."
        for child, _ in block.named_children():
            inside = [
                name
                for name in order
                if name == base + child or name.startswith(base + child + ".")
            ]
            if inside:
                last = max(inside, key=order.__getitem__)
                if by_name[last].d_out == width:
                    writers.append(last)
    if not writers:
        raise ValueError(f"found no layer of {type(model).__name__} writing to the residual stream")
    return sorted(writers, key=order.__getitem__)


def _embeddings(model: nn.Module) -> list[nn.Embedding]:
    """Token and learned position embeddings outside the blocks (they write to the stream)."""
    width = model.get_input_embeddings().weight.shape[1]
    _, blocks = decoder_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding) and id(m) not in inside and m.weight.shape[1] == width
    ]


@torch.no_grad()
def _stream_share(model: nn.Module, unit: torch.Tensor) -> float:
    """The largest |r̂ᵀh| / ‖h‖ over block inputs and the last output, on a short probe."""
    _, blocks = decoder_blocks(model)
    worst = [0.0]

    def measure(hidden: torch.Tensor) -> None:
        h = hidden.detach().double()
        share = (h @ unit.to(h.device)).abs() / h.norm(dim=-1).clamp_min(1e-30)
        worst[0] = max(worst[0], float(share.max()))

    def pre(_module, args, kwargs):
        measure(_hidden_of(args, kwargs)[0])

    def post(_module, _args, output):
        measure(output if isinstance(output, torch.Tensor) else output[0])

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(post))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(min(vocab, 7), device=input_device(model)).unsqueeze(0)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return worst[0]


@torch.no_grad()
def orthogonalize(model: nn.Module, direction: torch.Tensor, *, check: bool = True) -> list[str]:
    """Project ``r̂`` out of every weight writing to the residual stream, in place (dtype and
    device kept): embeddings ``E ← E − (E r̂) r̂ᵀ``, writers ``W ← W − r̂ (r̂ᵀ W)`` and their
    biases. Tied output embeddings are untied first (the unembedding is not a writer). Returns
    the names edited. ``check``: verify on a probe that the stream holds no ``r̂`` afterwards
    (a model that normalises its writes, Gemma 2/3, fails it: use ``ablated``)."""
    _check_width(model, direction)
    unit = _unit(direction)
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
        if getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False
    edited = []
    names = {id(m): n for n, m in model.named_modules()}
    for emb in _embeddings(model):
        e = emb.weight
        u = unit.to(device=e.device)
        e.copy_((e.double() - torch.outer(e.double() @ u, u)).to(e.dtype))
        edited.append(names[id(emb)])
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    for name in residual_writers(model):
        layer = layers[name]
        w = layer.weight  # (d_model, d_in) view
        u = unit.to(device=w.device)
        w.copy_((w.double() - torch.outer(u, u @ w.double())).to(w.dtype))
        bias = getattr(layer.module, "bias", None)
        if bias is not None:
            bias.copy_((bias.double() - u * (u @ bias.double())).to(bias.dtype))
        edited.append(name)
    if check:
        share = _stream_share(model, unit)
        tolerance = 1e-5 if model.get_input_embeddings().weight.dtype == torch.float32 else 2e-2
        if share > tolerance:
            raise ValueError(
                f"after orthogonalising, the residual stream of {type(model).__name__} still "
                f"holds the direction (|r̂ᵀh|/‖h‖ up to {share:.2g}): it normalises or "
                "transforms a block's writes before adding them; use ablated() instead"
            )
    return edited


def random_direction(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A direction drawn uniformly on the sphere with ``like``'s norm, shape and dtype (the
    random control of an ablation or an addition)."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return (draw / draw.norm() * like.double().norm()).to(like.dtype)


# ----------------------------------------------------------------------------------------------
# Refusal score and selection


def refusal_prefixes(
    tokenizer,
    refusals: Sequence[Example],
    answers: Sequence[Example] = (),
    *,
    max_prefix: int = 4,
) -> list[tuple[int, ...]]:
    """Token openings of refusals: for each refusal pair (prompt, refusal), the shortest opening
    of its response tokens, at most ``max_prefix`` long, that no answer of ``answers`` opens
    with; pairs with none are skipped, and an opening that extends another is dropped (so the
    probabilities of the openings add up). Sorted."""
    if max_prefix < 1:
        raise ValueError(f"max_prefix must be >= 1, got {max_prefix}")

    def response_ids(example: Example) -> tuple[int, ...]:
        e = encode(tokenizer, example, eos=False)
        return tuple(e.input_ids[e.counted].tolist())

    answered = [response_ids(a) for a in answers]
    opens = {a[:k] for a in answered for k in range(1, max_prefix + 1)}
    found: set[tuple[int, ...]] = set()
    for refusal in refusals:
        ids = response_ids(refusal)
        for k in range(1, min(max_prefix, len(ids)) + 1):
            if ids[:k] not in opens:
                found.add(ids[:k])
                break
    minimal = {p for p in found if not any(q != p and p[: len(q)] == q for q in found)}
    if not minimal:
        raise ValueError(
            f"no opening of at most {max_prefix} tokens tells the refusals from the answers; "
            "give the refusal prefixes yourself or a larger max_prefix"
        )
    return sorted(minimal)


@torch.no_grad()
def refusal_scores(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    prefixes: Sequence[Sequence[int]],
    *,
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """(n,) float64 refusal score of each prompt: log-odds that the response opens with one of
    ``prefixes`` (teacher-forced probabilities of each opening, summed)."""
    prompts = _check_prompts(prompts, "scored")
    prefixes = [tuple(p) for p in prefixes]
    if not prefixes or any(len(p) == 0 for p in prefixes):
        raise ValueError("refusal prefixes must be non-empty token sequences")
    encoded = _encoded(tokenizer, prompts, system_prompt)
    rows = [(i, j) for i in range(len(prompts)) for j in range(len(prefixes))]
    sequences = [encoded[i] + list(prefixes[j][:-1]) for i, j in rows]
    device = input_device(model)
    was_training = model.training
    model.eval()
    logp = torch.zeros(len(rows), dtype=torch.float64)
    longest = max(len(p) for p in prefixes)
    try:
        for chunk, ids, attention in _batches(sequences, batch_size, pad_id(tokenizer, 0)):
            out = model(input_ids=ids.to(device), attention_mask=attention.to(device))
            logits = out.logits[:, -longest:, :].double().log_softmax(-1)
            for b, r in enumerate(chunk):
                prefix = prefixes[rows[r][1]]
                k = len(prefix)
                at = logits[b, longest - k :, :]  # position −k predicts the prefix's first token
                target = torch.tensor(prefix, device=at.device)
                logp[r] = at.gather(1, target[:, None]).sum().cpu()
    finally:
        model.train(was_training)
    p = logp.view(len(prompts), len(prefixes)).exp().sum(1).clamp(1e-12, 1 - 1e-12)
    return p.log() - (-p).log1p()


@dataclass(frozen=True)
class Candidate:
    """One (layer, position) judged: bypass and induce refusal scores, KL, and why it was
    filtered out (empty when it was eligible)."""

    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    filtered: str = ""


@dataclass
class Selection:
    """The chosen candidate, its direction r (d,) float64, every candidate judged, the baseline
    refusal scores (harmful, harmless) and the settings."""

    chosen: Candidate
    direction: torch.Tensor
    candidates: list[Candidate]
    baseline: tuple[float, float]
    settings: dict

    def rows(self) -> list[dict]:
        """Candidates as table rows, the chosen one marked."""
        return [{**c.__dict__, "chosen": c == self.chosen} for c in self.candidates]

    def save(self, path: str | Path) -> Path:
        """The direction with the selection (as JSON in the header), safetensors, atomically."""
        import json

        meta = {
            "chosen": json.dumps(self.chosen.__dict__),
            "candidates": json.dumps([c.__dict__ for c in self.candidates]),
            "baseline": json.dumps(list(self.baseline)),
            "settings": json.dumps(self.settings),
        }
        return save_tensors({"direction": self.direction}, path, format=SELECTED, metadata=meta)


SELECTED = "pyattr.refusal-direction/1"


def load_selection(path: str | Path) -> Selection:
    """Read what ``Selection.save`` wrote."""
    import json

    tensors, meta = load_tensors(path, SELECTED)
    return Selection(
        Candidate(**json.loads(meta["chosen"])),
        tensors["direction"],
        [Candidate(**c) for c in json.loads(meta["candidates"])],
        tuple(json.loads(meta["baseline"])),
        json.loads(meta["settings"]),
    )


_SAME = "the sets do not differ here"


def select_direction(
    model: nn.Module,
    tokenizer,
    directions: RefusalDirections,
    harmful: Sequence[str],
    harmless: Sequence[str],
    prefixes: Sequence[Sequence[int]],
    *,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    batch_size: int = 32,
    progress: bool = True,
) -> Selection:
    """Judge every (layer, position) of ``directions`` on held-out ``harmful`` and ``harmless``
    prompts (bypass, induce, KL; see the module's docstring) and choose the eligible one with
    the lowest bypass score. When none is eligible, the lowest bypass score of all is chosen and
    its ``filtered`` says which criterion it fails; never a candidate where the sets do not
    differ (a zero direction, which no edit can use)."""
    from tqdm.auto import tqdm

    from .evaluate.kl import harmless_kl, next_token_logprobs

    if not 0.0 < max_layer_fraction <= 1.0:
        raise ValueError(f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}")
    harmful = _check_prompts(harmful, "harmful")
    harmless = _check_prompts(harmless, "harmless")
    system = directions.meta.get("system_prompt") or None
    options = {"system_prompt": system, "batch_size": batch_size}
    base_harmful = float(refusal_scores(model, tokenizer, harmful, prefixes, **options).mean())
    base_harmless = float(refusal_scores(model, tokenizer, harmless, prefixes, **options).mean())
    reference = next_token_logprobs(model, tokenizer, harmless, **options)
    grid = [(layer, pos) for layer in range(directions.layers) for pos in directions.positions]
    candidates = []
    for layer, pos in tqdm(grid, desc="select direction", unit="candidate", disable=not progress):
        r = directions.direction(layer, pos)
        if float(r.norm()) == 0.0:  # the same tokens in both sets (block 0, template positions)
            candidates.append(Candidate(layer, pos, base_harmful, base_harmless, 0.0, _SAME))
            continue
        with ablated(model, r):
            bypass = float(refusal_scores(model, tokenizer, harmful, prefixes, **options).mean())
            kl = harmless_kl(model, tokenizer, harmless, reference, **options)
        with added(model, r, layer):
            induce = float(refusal_scores(model, tokenizer, harmless, prefixes, **options).mean())
        reasons = []
        if layer >= max_layer_fraction * directions.layers:
            reasons.append(f"layer >= {max_layer_fraction:g} of the blocks")
        if not induce > induce_threshold:
            reasons.append(f"induce <= {induce_threshold:g}")
        if not kl < kl_threshold:
            reasons.append(f"kl >= {kl_threshold:g}")
        candidates.append(Candidate(layer, pos, bypass, induce, kl, "; ".join(reasons)))
    differ = [c for c in candidates if c.filtered != _SAME]
    if not differ:
        raise ValueError("the two prompt sets' means do not differ at any block and position")
    eligible = [c for c in differ if not c.filtered] or differ  # never a zero direction
    chosen = min(eligible, key=lambda c: (c.bypass, c.layer, c.position))
    settings = {
        "max_layer_fraction": max_layer_fraction,
        "kl_threshold": kl_threshold,
        "induce_threshold": induce_threshold,
        "prefixes": [list(p) for p in prefixes],
        "system_prompt": system or "",
        "harmful_val": len(harmful),
        "harmless_val": len(harmless),
        "any_eligible": any(not c.filtered for c in candidates),
    }
    return Selection(
        chosen,
        directions.direction(chosen.layer, chosen.position),
        candidates,
        (base_harmful, base_harmless),
        settings,
    )


def _split_prompts(items: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split of ``items`` into (fit, held out ``val_fraction``), order kept."""
    import random

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    k = round(val_fraction * len(items))
    if not 1 <= k < len(items):
        raise ValueError(
            f"{len(items)} prompts cannot be split {1 - val_fraction:g}/{val_fraction:g}: "
            "each part needs at least one"
        )
    held = set(random.Random(seed).sample(range(len(items)), k))
    return [x for i, x in enumerate(items) if i not in held], [
        x for i, x in enumerate(items) if i in held
    ]


def refusal_direction(
    model: nn.Module,
    tokenizer,
    refusals: Sequence[Example],
    answers: Sequence[Example],
    *,
    prefixes: Sequence[Sequence[int]] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    positions: int | None = None,
    system_prompt: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
    **criteria,
) -> tuple[RefusalDirections, Selection]:
    """The refusal direction from a safety set (harmful prompts with refusals) and a utility
    set (ordinary prompts with answers): means from ``1 − val_fraction`` of each set's prompts
    at the post-instruction tokens and the responses' ``shared_opening``, selection on the
    rest, refusal prefixes from the responses (``refusal_prefixes``) unless given.
    ``criteria``: ``select_direction``'s thresholds."""
    harmful = [e.prompt for e in refusals]
    harmless = [e.prompt for e in answers]
    fit_harmful, val_harmful = _split_prompts(harmful, val_fraction, seed)
    fit_harmless, val_harmless = _split_prompts(harmless, val_fraction, seed)
    if prefixes is None:
        prefixes = refusal_prefixes(tokenizer, refusals, answers)
    opening = shared_opening(tokenizer, [*refusals, *answers])
    directions = find_directions(
        model,
        tokenizer,
        fit_harmful,
        fit_harmless,
        positions=positions,
        opening=opening,
        system_prompt=system_prompt,
        batch_size=batch_size,
        progress=progress,
    )
    selection = select_direction(
        model,
        tokenizer,
        directions,
        val_harmful,
        val_harmless,
        prefixes,
        batch_size=batch_size,
        progress=progress,
        **criteria,
    )
    selection.settings |= {"val_fraction": val_fraction, "seed": seed}
    return directions, selection


def plot_selection(selection: Selection, path: str | Path) -> Path:
    """Bypass and induce refusal scores and KL of every candidate against the block, one line
    per position, the chosen candidate circled; a PNG written atomically."""

    from ._plot import pyplot, save_png

    plt = pyplot()
    positions = sorted({c.position for c in selection.candidates})
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.4), sharex=True)
    panels = (
        ("bypass", "refusal score, harmful, direction ablated", selection.baseline[0]),
        ("induce", "refusal score, harmless, direction added", selection.baseline[1]),
        ("kl", "KL on harmless, direction ablated", None),
    )
    for ax, (key, title, baseline) in zip(axes, panels, strict=True):
        for pos in positions:
            cs = [c for c in selection.candidates if c.position == pos]
            ax.plot(
                [c.layer for c in cs],
                [getattr(c, key) for c in cs],
                marker=".",
                label=f"position {pos}",
            )
        chosen = selection.chosen
        ax.scatter(
            [chosen.layer],
            [getattr(chosen, key)],
            s=120,
            facecolors="none",
            edgecolors="red",
            label="chosen",
            zorder=3,
        )
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls=":", lw=1, label="unedited")
        if key == "kl":
            ax.axhline(
                selection.settings["kl_threshold"],
                color="black",
                ls="--",
                lw=1,
                label="KL threshold",
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decoder block")
    axes[0].set_ylabel("log-odds of a refusal opening")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
