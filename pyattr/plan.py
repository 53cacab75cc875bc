"""The memory planner: how many bytes the statistics asked for will take, and how to split the
layers into passes when they do not fit (DESIGN.md, "Scale").

What is counted is what calibration keeps resident: per input group Σx² (float64) and, with
"covariance", Σxxᵀ (d_in² in the accumulate dtype); per layer, with "snip" and "grad_sum",
Σ|∂L/∂W| and Σ∂L/∂W (fp32, d_out × d_in each). The model itself, activations and transient
gradients are not counted: the budget is for the statistics. Items are packed greedily in module
order, so a pass covers a contiguous range of blocks; with ``layerwise=True`` a pass never spans
two blocks (one block is resident at a time).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .models import LinearLayer, resident_device

__all__ = [
    "Item",
    "Plan",
    "execution_device",
    "format_bytes",
    "home_device",
    "items_for",
    "parse_bytes",
    "plan_calibration",
    "plan_passes",
]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})

Budget = int | str | Mapping[str | torch.device, int | str] | None


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``"20GB"``, ``"512 MiB"`` or ``"1.5e9"``."""
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be bytes (int) or a size such as '20GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size: use bytes or e.g. '20GB', '512MiB'")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


@dataclass(frozen=True)
class Item:
    """One accumulator: an input group's statistics (``kind="group"``, keyed by the group's
    first layer) or one layer's gradient sums (``kind="snip"``: Σ|∂L/∂W|, Σ∂L/∂W or both)."""

    kind: str
    key: str
    block: int
    device: str
    bytes: int


@dataclass
class Plan:
    """Passes over the data set, each a list of accumulators that fit the budget together."""

    passes: list[list[Item]]
    budget: dict[str, int] = field(default_factory=dict)
    layerwise: bool = False

    def total(self) -> dict[str, int]:
        """Bytes of all accumulators, per device."""
        out: dict[str, int] = {}
        for item in (i for p in self.passes for i in p):
            out[item.device] = out.get(item.device, 0) + item.bytes
        return out

    def peak(self) -> dict[str, int]:
        """The largest bytes one pass holds, per device."""
        out: dict[str, int] = {}
        for items in self.passes:
            for device, size in _per_device(items).items():
                out[device] = max(out.get(device, 0), size)
        return out

    def describe(self) -> str:
        """One line a person reads to know what was chosen and why."""
        need = ", ".join(f"{format_bytes(b)} on {d}" for d, b in self.total().items())
        budget = ", ".join(f"{format_bytes(b)} on {d}" for d, b in self.budget.items()) or "none"
        if self.layerwise:
            blocks = len({i.block for p in self.passes for i in p})
            split = len(self.passes) - blocks
            return (
                f"layerwise: one block resident at a time, its statistics then moved to the CPU; "
                f"statistics need {need} in all, at most "
                f"{', '.join(format_bytes(b) for b in self.peak().values())} at once "
                f"(budget {budget})"
                + (f"; {split} extra runs of a block whose statistics exceed it" if split else "")
            )
        if len(self.passes) == 1:
            return f"statistics need {need} (budget {budget}): one pass"
        ranges = []
        for items in self.passes:
            first, last = items[0].block, items[-1].block
            ranges.append(f"block {first}" if first == last else f"blocks {first}-{last}")
        return (
            f"statistics need {need}, over the budget ({budget}): {len(self.passes)} passes "
            f"({'; '.join(ranges)}), finished statistics moved to the CPU between passes"
        )


def _per_device(items: Sequence[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item.device] = out.get(item.device, 0) + item.bytes
    return out


def home_device(layer: LinearLayer) -> torch.device:
    """Where a layer's statistics accumulate: its weight's device, or for a weight offloaded by
    accelerate (a meta placeholder) the device its hook executes on."""
    return resident_device(layer.module, layer.module.weight)


def items_for(
    groups: Sequence[Sequence[LinearLayer]],
    layers: Sequence[LinearLayer],
    collect: Sequence[str],
    accumulate_dtype: torch.dtype,
    device: torch.device | None = None,
) -> list[Item]:
    """The accumulators a calibration keeps, in module order. ``device``: where they live
    (the layerwise execution device), else each layer's weight device."""
    width = torch.empty((), dtype=accumulate_dtype).element_size()
    items = []
    for group in groups:
        d = group[0].d_in
        size = d * 8 + (d * d * width if "covariance" in collect else 0)
        where = device if device is not None else home_device(group[0])
        items.append(Item("group", group[0].name, group[0].block, str(where), size))
    gradient_sums = sum(c in collect for c in ("snip", "grad_sum"))
    if gradient_sums:
        for layer in layers:
            where = device if device is not None else home_device(layer)
            size = layer.d_out * layer.d_in * 4 * gradient_sums
            items.append(Item("snip", layer.name, layer.block, str(where), size))
    order = {layer.name: i for i, layer in enumerate(layers)}
    return sorted(items, key=lambda it: (it.block, order[it.key], it.kind))


def _default_budget(devices: set[str]) -> dict[str, int]:
    """80% of the free memory of each CUDA device; no limit on the CPU."""
    budget = {}
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget[name] = int(0.8 * free)
    return budget


def _budget(max_memory: Budget, devices: set[str]) -> dict[str, int]:
    if max_memory is None:
        return _default_budget(devices)
    if isinstance(max_memory, Mapping):
        return {str(torch.device(k)): parse_bytes(v) for k, v in max_memory.items()}
    size = parse_bytes(max_memory)
    return {name: size for name in devices}


def plan_passes(
    items: Sequence[Item], max_memory: Budget = None, *, layerwise: bool = False
) -> Plan:
    """Pack ``items`` into passes under ``max_memory`` (bytes or a size string for every device,
    a ``{device: size}`` mapping, or ``None``: 80% of each CUDA device's free memory, no limit
    on the CPU). An accumulator larger than the budget on its own is an error."""
    budget = _budget(max_memory, {item.device for item in items})
    passes: list[list[Item]] = [[]]
    used: dict[str, int] = {}
    for item in items:
        limit = budget.get(item.device)
        if limit is not None and item.bytes > limit:
            raise ValueError(
                f"the {'covariance' if item.kind == 'group' else 'SNIP'} statistics of "
                f"{item.key} alone need {format_bytes(item.bytes)}, more than max_memory "
                f"{format_bytes(limit)} on {item.device}"
            )
        over = limit is not None and used.get(item.device, 0) + item.bytes > limit
        new_block = layerwise and passes[-1] and passes[-1][-1].block != item.block
        if passes[-1] and (over or new_block):
            passes.append([])
            used = {}
        passes[-1].append(item)
        used[item.device] = used.get(item.device, 0) + item.bytes
    return Plan(passes=passes, budget=budget, layerwise=layerwise)


def execution_device(device: str | torch.device | None) -> torch.device:
    """Where layerwise mode runs the blocks: ``device``, else CUDA when there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def plan_calibration(
    model,
    *,
    collect: Sequence[str] = ("norms",),
    layers: Sequence[LinearLayer] | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    max_memory: Budget = None,
    layerwise: bool = False,
    device: str | torch.device | None = None,
) -> Plan:
    """The plan ``pyattr.calibrate`` with the same arguments would follow, without running it
    (one two-token probe finds the input groups). ``print(plan.describe())``."""
    from .models import find_linear_layers, input_groups

    layers = list(layers) if layers is not None else find_linear_layers(model)
    exec_device = execution_device(device) if layerwise else None
    items = items_for(input_groups(model, layers), layers, collect, accumulate_dtype, exec_device)
    return plan_passes(items, max_memory, layerwise=layerwise)
