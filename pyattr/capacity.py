"""What every stage of a run will hold on each device, from the model's configuration alone.

``pyattr plan --model M`` (and ``plan_run``) builds the model on the meta device from its
``config.json`` (no weight is read or allocated), finds its linear layers and input groups as
calibration would, and counts per stage:

- weights: every parameter once (tied embeddings once), in the run's dtype;
- calibration: the statistics exactly as calibration allocates them (``plan.items_for``), the
  activations of one sample (an estimate, marked ``≈``), and what is done when they do not fit
  (several passes over the data, layer-by-layer mode, or the model spread over GPUs);
- eigenbases: each layer's kept eigenvectors (d_out × min(d_out, d_in), or ``keep``) in the
  eigen dtype for both data sets, held on the host, and the largest layer's working set;
- editing: the model and one layer's pair of bases; for a model larger than the GPUs, the
  weights offloaded to the host (or disk) and one layer, edited on the GPU at a time;
- generation: the KV cache per sequence (2 · layers · kv_heads · head_dim · tokens · bytes) and
  the largest batch that fits beside the weights.

Exact counts (weights, statistics, eigenbases, KV cache) are what the code allocates;
activations and workspaces are estimates, said so in the table. Input groups come from the
same probe as calibration, run on a copy of the configuration shrunk to tiny widths on the
CPU (a forward pass on the meta device is refused by transformers' mask code).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import LinearLayer, decoder_blocks, find_linear_layers, input_groups
from .plan import Item, format_bytes, items_for, plan_passes

__all__ = ["Machine", "Need", "RunPlan", "Settings", "Stage", "meta_model", "plan_run"]


@dataclass(frozen=True)
class Machine:
    """The hardware a run is planned for. ``processes``: torchrun ranks (data-parallel
    calibration, each rank holding the model on ``gpus // processes`` GPUs)."""

    gpus: int = 1
    gpu_memory: int = 80 * 10**9  # bytes per GPU
    host_memory: int | None = None  # bytes; None: not checked
    processes: int = 1
    usable: float = 0.9  # share of each GPU's memory a run may fill (CUDA context, allocator)

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.processes < 1:
            raise ValueError(f"gpus must be >= 0 and processes >= 1: {self.gpus}, {self.processes}")
        if self.gpus and self.gpus % self.processes:
            raise ValueError(f"{self.gpus} GPUs do not split evenly over {self.processes} ranks")
        if not 0 < self.usable <= 1:
            raise ValueError(f"usable must be in (0, 1], got {self.usable}")

    @property
    def gpus_per_rank(self) -> int:
        return self.gpus // self.processes if self.gpus else 0


@dataclass(frozen=True)
class Settings:
    """What the run does: the paper's defaults (128 samples per set, 256 new tokens)."""

    dtype: torch.dtype = torch.bfloat16
    collect: tuple[str, ...] = ("norms", "covariance", "snip")
    accumulate_dtype: torch.dtype = torch.float32
    eigen_dtype: torch.dtype = torch.float64
    keep: int | None = None  # eigenvectors kept per layer (None: all R)
    samples: int = 128  # per calibration set
    max_length: int = 512  # tokens of one calibration sample
    prompt_length: int = 128  # tokens of a harmful prompt in its chat template
    new_tokens: int = 256
    prompts: int = 520  # AdvBench
    batch: int | None = None  # generation batch (None: the largest that fits, up to prompts)


@dataclass
class Need:
    """One thing a stage holds: ``bytes`` on ``where`` ("gpu": per GPU; "host"; "disk")."""

    what: str
    where: str
    bytes: int
    exact: bool = True


@dataclass
class Stage:
    name: str
    needs: list[Need]
    decision: str
    fits: bool = True

    def on(self, where: str) -> int:
        return sum(n.bytes for n in self.needs if n.where == where)


@dataclass
class RunPlan:
    model: str
    parameters: int
    machine: Machine
    settings: Settings
    stages: list[Stage] = field(default_factory=list)
    facts: dict[str, int] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def describe(self) -> str:
        """The plan as a table a person reads: per stage, what is held where, and what is done."""
        m = self.machine
        gpus = f"{m.gpus} × {format_bytes(m.gpu_memory)} GPU" if m.gpus else "no GPU"
        host = format_bytes(m.host_memory) if m.host_memory else "not given"
        ranks = f", {m.processes} torchrun ranks" if m.processes > 1 else ""
        lines = [
            f"{self.model}: {self.parameters / 1e9:.2f}B parameters in "
            f"{str(self.settings.dtype).removeprefix('torch.')}; {gpus}{ranks}; host {host}",
            "",
            "| stage | holds | where | bytes |",
            "| --- | --- | --- | --- |",
        ]
        for s in self.stages:
            for n in s.needs:
                size = ("" if n.exact else "≈ ") + format_bytes(n.bytes)
                lines.append(f"| {s.name} | {n.what} | {n.where} | {size} |")
        lines.append("")
        for s in self.stages:
            lines.append(f"- {s.name}{'' if s.fits else ' (does not fit)'}: {s.decision}")
        lines.append("")
        lines.append("Bytes marked ≈ are estimates (activations, workspaces); the rest are exact.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = asdict(self)
        out["settings"] = {
            k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
            for k, v in out["settings"].items()
        }
        return out


def _config(source):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    path = Path(source)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"{path}: give a model folder or its config.json")
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (a plan reads only the configuration)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read {path / 'config.json'}: {exc}") from None


def meta_model(source) -> nn.Module:
    """The causal LM of ``source`` (a folder, its config.json or a config) on the meta device:
    every shape, no storage."""
    from transformers import AutoModelForCausalLM

    config = _config(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


GRADIENT = ("snip", "grad_sum")  # statistics that need a backward pass
_WIDTHS = ("hidden_size", "intermediate_size", "head_dim", "vocab_size", "moe_intermediate_size")


def _tiny(config):
    """A copy of ``config`` with the same structure (layers, heads, kv heads, biases, tying) and
    tiny widths: head_dim 4, hidden = heads · 4, intermediate 8, vocab 64."""
    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    heads = getattr(text, "num_attention_heads", None) or 4
    values = {"hidden_size": heads * 4, "intermediate_size": 8, "head_dim": 4, "vocab_size": 64}
    values["moe_intermediate_size"] = 8
    for key in _WIDTHS:
        if getattr(text, key, None) is not None:
            setattr(text, key, values[key])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value >= 64:
            setattr(text, key, None if key == "pad_token_id" else 1)
        if isinstance(value, list):
            setattr(text, key, [v if v < 64 else 1 for v in value])
    return small


def _groups(config, model: nn.Module, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Input groups by calibration's probe, on a tiny CPU copy of the configuration, mapped
    back by name; every layer in a group of its own where the copy cannot be built."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("cpu"):
            tiny = AutoModelForCausalLM.from_config(_tiny(config)).eval()
        names = [[layer.name for layer in g] for g in input_groups(tiny, find_linear_layers(tiny))]
    except Exception:  # noqa: BLE001 (any failure of the copy falls back to no sharing)
        return [[layer] for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    groups = [[by_name[n] for n in g if n in by_name] for g in names]
    grouped = {layer.name for g in groups for layer in g}
    groups += [[layer] for layer in layers if layer.name not in grouped]
    return [g for g in groups if g]


def _width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _kv_per_token(config, width: int) -> int:
    """KV cache bytes per token of one sequence: 2 · layers · kv_heads · head_dim · width."""
    text = _text_config(config)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv * head_dim * width


def sequence_bytes(config, dtype: torch.dtype, prompt_length: int, new_tokens: int) -> int:
    """What one sequence of generation holds beside the weights: its KV cache over prompt and
    new tokens, the last position's logits in fp32 twice (processors, sampling), and prefill's
    transient rows (an estimate). The generation stage's count and ``auto_batch_size``'s."""
    text = _text_config(config)
    width = _width(dtype)
    hidden, vocab = text.hidden_size, text.vocab_size
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    return (
        _kv_per_token(config, width) * (prompt_length + new_tokens)
        + vocab * 8
        + prompt_length * (2 * hidden + 2 * inter) * width
    )


def _block_devices(blocks: int, gpus: int) -> list[int]:
    """Which GPU each decoder block goes to when ``gpus`` share a model (contiguous, even)."""
    return [b * gpus // blocks for b in range(blocks)]


def plan_run(
    source,
    machine: Machine | None = None,
    settings: Settings | None = None,
) -> RunPlan:
    """The plan of a whole run (calibration of both sets, eigenbases, editing, generation) for
    the model of ``source`` (folder, config.json or config) on ``machine``; nothing is loaded."""
    machine = machine or Machine()
    settings = settings or Settings()
    config = _config(source)
    model = meta_model(config)
    layers = find_linear_layers(model)
    groups = _groups(config, model, layers)
    text = _text_config(config)
    width = _width(settings.dtype)
    parameters = sum(p.numel() for p in model.parameters())
    weights = parameters * width
    hidden, vocab = text.hidden_size, text.vocab_size
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    kv_token = _kv_per_token(config, width)
    _, blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    plan = RunPlan(name or type(model).__name__, parameters, machine, settings)
    plan.facts = {
        "weights": weights,
        "layers": len(layers),
        "groups": len(groups),
        "blocks": n_blocks,
        "kv_bytes_per_token": kv_token,
    }
    usable = int(machine.gpu_memory * machine.usable)
    g = machine.gpus_per_rank
    plan.stages += _calibration(
        plan, layers, groups, weights, (hidden, inter, vocab, n_blocks), usable, g
    )
    plan.stages.append(_eigenbases(plan, layers))
    plan.stages.append(_editing(plan, layers, weights, usable, machine.gpus))
    plan.stages.append(_generation(plan, weights, kv_token, config, usable))
    if machine.host_memory is not None:
        for stage in plan.stages:
            if stage.fits and stage.on("host") > machine.host_memory:
                stage.fits = False
                stage.decision += (
                    f"; but it holds {format_bytes(stage.on('host'))} on the host, more than "
                    f"its {format_bytes(machine.host_memory)}"
                )
    return plan


def _activations(settings: Settings, hidden: int, inter: int, vocab: int, blocks: int) -> int:
    """≈ bytes of one calibration sample's activations: forward only (norms, covariance) holds
    a few hidden- and intermediate-wide rows and the fp32 logits; a SNIP backward keeps about
    10 hidden-wide and 4 intermediate-wide values per token per block (Llama-style block with
    SDPA attention), plus logits in the model dtype and fp32."""
    tokens, width = settings.max_length, _width(settings.dtype)
    logits = tokens * vocab * (width + 8)
    if any(c in settings.collect for c in GRADIENT):
        return tokens * blocks * (10 * hidden + 4 * inter) * width + logits
    return tokens * (4 * hidden + 3 * inter) * width + logits


def _calibration(plan, layers, groups, weights, widths, usable, g) -> list[Stage]:
    """Calibration of each set: one resident pass or several (the model on its GPUs), else
    layer by layer for the forward statistics, with SNIP (a backward through the whole model)
    refused where the model cannot be resident."""
    s, m = plan.settings, plan.machine
    hidden, inter, vocab, n_blocks = widths
    snip = any(c in s.collect for c in GRADIENT)
    act = _activations(s, hidden, inter, vocab, n_blocks)
    items = items_for(groups, layers, s.collect, s.accumulate_dtype, torch.device("cpu"))
    stats = sum(i.bytes for i in items)
    per_rank = f" on each of {m.processes} ranks" if m.processes > 1 else ""
    if not g:
        needs = [
            Need("weights", "host", weights),
            Need("statistics", "host", stats),
            Need("activations, one sample", "host", act, False),
        ]
        return [Stage("calibration", needs, "on the CPU: one pass over each set")]
    needs = [Need("weights", "gpu", weights // g)]
    if weights + act <= g * usable:  # the model is resident (spread over g GPUs if needed)
        devices = _block_devices(n_blocks, g)
        placed = [Item(i.kind, i.key, i.block, f"cuda:{devices[i.block]}", i.bytes) for i in items]
        act = act // g  # each block's activations live on its GPU
        left = max(usable - weights // g - act, 1)  # beside the model's share and one sample
        too_big = next((i for i in placed if i.bytes > left), None)
        if too_big is not None:
            return [
                Stage(
                    "calibration",
                    needs + [Need("statistics", "gpu", stats // g)],
                    f"the statistics of {too_big.key} alone ({format_bytes(too_big.bytes)}) "
                    f"exceed the {format_bytes(left)} left beside the model; use more GPUs or "
                    "collect fewer statistics",
                    fits=False,
                )
            ]
        passes = plan_passes(placed, {f"cuda:{k}": left for k in range(g)})
        several = len(passes.passes) > 1
        needs += [
            Need("statistics, largest pass", "gpu", max(passes.peak().values())),
            Need("activations, one sample", "gpu", act, False),
            Need("finished statistics", "host", stats if several else 0),
        ]
        spread = f"the model spread over {g} GPUs (device_map), " if weights > usable else ""
        how = (
            f"{len(passes.passes)} passes over each set (statistics {format_bytes(stats)} "
            "exceed what is left beside the model; finished ones move to the host)"
            if several
            else "one pass over each set"
        )
        return [Stage("calibration", needs, f"{spread}{how}{per_rank}")]
    stages = []
    forward = tuple(c for c in s.collect if c not in GRADIENT)
    if forward:
        stages.append(_layerwise(plan, layers, groups, forward, weights, hidden, usable, g))
    if snip:
        least = -(-(weights + act) // usable)
        stages.append(
            Stage(
                "calibration (snip)",
                [Need("weights and one sample's activations", "gpu", weights + act, False)],
                f"SNIP needs the whole model resident for its backward pass: weights "
                f"{format_bytes(weights)} and one sample's activations ≈{format_bytes(act)} "
                f"exceed {g} × {format_bytes(usable)}; it needs at least {least} GPUs in one "
                "process (device_map), or leave snip out",
                fits=False,
            )
        )
    return stages


def _layerwise(plan, layers, groups, forward, weights, hidden, usable, g) -> Stage:
    s, m = plan.settings, plan.machine
    blocks = plan.facts["blocks"]
    block = weights // blocks
    cache = s.samples * s.max_length * hidden * _width(s.dtype)
    items = items_for(groups, layers, forward, s.accumulate_dtype, torch.device("cuda"))
    layerwise = plan_passes(items, max(usable - block - cache, 1), layerwise=True)
    needs = [
        Need("weights", "host", weights),
        Need("one block", "gpu", block),
        Need("hidden states of the set", "gpu", cache),
        Need("statistics, largest pass", "gpu", max(layerwise.peak().values())),
        Need("finished statistics", "host", sum(i.bytes for i in items)),
    ]
    split = len(layerwise.passes) - blocks
    extra = f"; {split} blocks run twice, their statistics exceeding one pass" if split else ""
    per_rank = f" on each of {m.processes} ranks" if m.processes > 1 else ""
    return Stage(
        f"calibration ({', '.join(forward)})",
        needs,
        f"layer by layer: weights {format_bytes(weights)} exceed {g} × {format_bytes(usable)}, "
        f"so one block is resident at a time and the set's hidden states wait on the GPU{extra}"
        f"{per_rank}",
    )


def _basis_columns(layer: LinearLayer, keep: int | None) -> int:
    rank = min(layer.d_out, layer.d_in)
    return rank if keep is None else min(keep, rank)


def _eigenbases(plan: RunPlan, layers: list[LinearLayer]) -> Stage:
    s, m = plan.settings, plan.machine
    eb = _width(s.eigen_dtype)
    bases = sum(  # kept eigenvectors (d_out × k) and all R eigenvalues
        (layer.d_out * _basis_columns(layer, s.keep) + min(layer.d_out, layer.d_in)) * eb
        for layer in layers
    )

    def working(layer: LinearLayer) -> int:  # C, its factor, W, then A and its eigenvectors
        d_out, d_in = layer.d_out, layer.d_in  # (direct) or W F and its thin U (input side)
        if d_out > d_in:
            return (2 * d_in * d_in + 3 * d_out * d_in) * eb
        return (d_in * d_in + d_out * d_in + 2 * d_out * d_out) * eb

    work = max(working(layer) for layer in layers)
    where = "gpu" if m.gpus else "host"
    needs = [
        Need("eigenbases of both sets", "host", 2 * bases),
        Need("largest layer's workspace", where, work, False),
    ]
    fits = m.host_memory is None or 2 * bases <= m.host_memory
    kept = "every R" if s.keep is None else f"keep={s.keep}"
    decision = (
        f"one layer at a time on the {'GPU' if m.gpus else 'CPU'} in "
        f"{str(s.eigen_dtype).removeprefix('torch.')}, {kept}, each basis moved to the host as it "
        f"finishes; {format_bytes(bases)} per set"
    )
    if not fits:
        decision += (
            f": both sets' {format_bytes(2 * bases)} exceed the host's "
            f"{format_bytes(m.host_memory)}; keep fewer eigenvectors (--keep, the sweep needs "
            "only the ranks it edits) or float32 eigenbases"
        )
    return Stage("eigenbases", needs, decision, fits)


def _editing(plan: RunPlan, layers, weights: int, usable: int, g: int) -> Stage:
    s = plan.settings
    eb = _width(s.eigen_dtype)
    pair = max(2 * layer.d_out * _basis_columns(layer, s.keep) * eb for layer in layers)
    if g and weights + pair <= g * usable:
        where = f"spread over {g} GPUs" if weights > usable else "on the GPU"
        needs = [Need("weights", "gpu", weights // g), Need("one layer's two bases", "gpu", pair)]
        return Stage("editing", needs, f"in place, the model {where}, one layer's bases at a time")
    if not g:
        needs = [Need("weights", "host", weights), Need("one layer's two bases", "host", pair)]
        return Stage("editing", needs, "in place on the host, where the weights are (CPU)")
    one = max(layer.d_out * layer.d_in for layer in layers) * _width(s.dtype)
    work = max(layer.d_out * layer.d_in for layer in layers) * eb  # W in the eigen dtype
    host = plan.machine.host_memory
    store = "disk" if host is not None and weights > host else "host"
    needs = [
        Need("weights (offloaded)", store, weights),
        Need("one layer, its two bases and W in the eigen dtype", "gpu", one + pair + work),
    ]
    return Stage(
        "editing",
        needs,
        f"layer by layer: the weights stay on the {store} (accelerate offload, --device-map), "
        "each layer is edited on the GPU and written back (pyattr.offload)",
    )


def _generation(plan: RunPlan, weights: int, kv_token: int, config, usable: int) -> Stage:
    s, m = plan.settings, plan.machine
    tokens = s.prompt_length + s.new_tokens
    per_sequence = sequence_bytes(config, s.dtype, s.prompt_length, s.new_tokens)
    plan.facts["generation_bytes_per_sequence"] = per_sequence
    g = m.gpus  # generation runs in one process over every GPU of the machine
    room = g * usable - weights if g else None
    needs = [Need("weights", "gpu" if g else "host", weights // max(g, 1))]
    if room is not None and room < per_sequence:
        least = -(-(weights + per_sequence) // usable)
        return Stage(
            "generation",
            needs,
            f"weights {format_bytes(weights)} leave no room for one sequence on {g} × "
            f"{format_bytes(usable)}; it needs at least {least} GPUs (device_map or vLLM's "
            "tensor parallelism)",
            fits=False,
        )
    fit = s.prompts if room is None else min(s.prompts, room // per_sequence)
    batch = fit if s.batch is None else s.batch
    plan.facts["generation_batch"] = batch
    needs += [
        Need(
            f"KV cache, batch {batch} × {tokens} tokens",
            "gpu" if g else "host",
            kv_token * tokens * batch // max(g, 1),
        ),
        Need(
            "logits and prefill rows",
            "gpu" if g else "host",
            (per_sequence - kv_token * tokens) * batch // max(g, 1),
            False,
        ),
    ]
    fits = s.batch is None or room is None or s.batch <= fit
    decision = f"batch {batch} ({'the largest that fits' if s.batch is None else 'as asked'}"
    decision += f", at most {fit} fit)" if room is not None else ")"
    if not fits:
        decision += f": batch {s.batch} does not fit, at most {fit} do"
    return Stage("generation", needs, decision, fits)


def save_plan(plan: RunPlan, path: str | Path) -> None:
    """The plan as JSON, atomically."""
    from .io import atomic_write

    atomic_write(path, json.dumps(plan.to_json(), indent=2, default=str) + "\n")
