"""Reading and writing the weights of a model that does not fit on its execution device
(DESIGN.md, "Scale": editing layer by layer).

A weight is *resident* (a real tensor, on the CPU or an accelerator) or *offloaded* by
accelerate (``cpu_offload``, ``disk_offload``, ``dispatch_model`` or ``from_pretrained`` with
a ``device_map`` naming "cpu" or "disk"): the module then holds a meta placeholder and its hook
loads the value from a weights map before each forward. Edits (pruning, rewinding, rank edits)
go through ``writable``, which hands them the weight as a real (d_out, d_in) tensor on the
device the edit computes on, one layer at a time, and writes the result back where the weight
lives:

- a resident weight is edited in place (through a device copy when ``device`` differs);
- a weight offloaded to host memory gets a new tensor in the weights map;
- a weight offloaded to disk is written to a safetensors file of pyattr's (never into the
  checkpoint the map reads from) and the map's index entry points to it.

Inside ``with journal:`` every write through ``writable`` first records what it replaces, so
that ``journal.restore()`` puts the model back bit for bit: a sweep of a model too large to
copy edits it in place and restores it after each point.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import LinearLayer

__all__ = ["Journal", "has_offloaded", "read", "writable"]


@dataclass
class _Slot:
    """Where an offloaded weight's value lives: ``store[key]`` (a dict of host tensors) or, for
    a weight on disk, ``index[key]`` of accelerate's ``OffloadedWeightsLoader``."""

    store: MutableMapping
    key: str
    execution: torch.device
    index: MutableMapping | None = None  # set for a weight on disk
    loader: object = None

    def load(self) -> torch.Tensor:
        return (self.loader if self.loader is not None else self.store)[self.key]


def _device(execution) -> torch.device:
    return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _slot(module: nn.Module, name: str = "weight") -> _Slot | None:
    """The offloaded value of ``module.<name>``, or None when the tensor is resident."""
    if getattr(module, name).device.type != "meta":
        return None
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is None or not getattr(hook, "offload", False):
            continue
        prefix = getattr(weights, "prefix", "")
        dataset = getattr(weights, "dataset", weights)
        key = prefix + name
        execution = _device(hook.execution_device)
        state = getattr(dataset, "state_dict", None)
        index = getattr(dataset, "index", None)
        if state is not None and index is not None:  # accelerate's OffloadedWeightsLoader
            if key in state:
                return _Slot(state, key, execution)
            if key in index:
                return _Slot(state, key, execution, index=index, loader=dataset)
        elif isinstance(dataset, MutableMapping) and key in dataset:
            return _Slot(dataset, key, execution)
        raise TypeError(
            f"{type(module).__name__}.{name} is offloaded to a {type(dataset).__name__} that "
            "pyattr cannot write to (expected accelerate's weights map or a dict)"
        )
    raise ValueError(
        f"{type(module).__name__}.{name} is on the meta device with no accelerate hook that "
        "offloads it: load the model's weights (or dispatch it with accelerate) before editing"
    )


def has_offloaded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is an offloaded meta placeholder."""
    return any(p.device.type == "meta" for p in model.parameters())


def _where(layer: LinearLayer, slot: _Slot | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return slot.execution if slot is not None else layer.module.weight.device


def read(layer: LinearLayer, device: torch.device | str | None = None) -> torch.Tensor:
    """W as (d_out, d_in), a real tensor on ``device`` (default: where the layer computes);
    a resident weight already there is returned as the parameter's own view, without a copy."""
    slot = _slot(layer.module)
    where = _where(layer, slot, device)
    w = layer.module.weight if slot is None else slot.load()
    return layer.relayout(w.detach().to(where))


def _edit_folder(model: nn.Module | None, slot: _Slot) -> Path:
    """pyattr's folder for edited disk weights: beside accelerate's offload folder when there
    is one (the disk the user chose for offloading), else under $PYATTR_OFFLOAD_DIR or the
    temporary directory. One per model, made on first use, removed with the model."""
    holder = model if model is not None else slot.loader
    folder = getattr(holder, "_pyattr_edit_folder", None)
    if folder is None:
        base = getattr(slot.loader, "save_folder", None) or os.environ.get("PYATTR_OFFLOAD_DIR")
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="pyattr-edits-", dir=base))
        object.__setattr__(holder, "_pyattr_edit_folder", folder)
        # removed with the model (or at exit): the edited weights live only as long as it does
        weakref.finalize(holder, shutil.rmtree, folder, True)
    return folder


def _write_disk(slot: _Slot, value: torch.Tensor, folder: Path) -> Path:
    """Write ``value`` to a new safetensors file of pyattr's and point the index at it; returns
    the file. A new name for every write: a file an index entry (or a journal's original)
    still names is never overwritten."""
    from safetensors.torch import save_file

    from .io import write_atomically

    safe = slot.key.replace(os.sep, "_")
    path = folder / f"{safe}.{uuid.uuid4().hex[:12]}.safetensors"
    payload = {slot.key: value.detach().contiguous().cpu()}
    write_atomically(path, lambda tmp: save_file(payload, tmp))
    dtype = str(value.dtype).removeprefix("torch.")
    slot.index[slot.key] = {"safetensors_file": str(path), "weight_name": slot.key, "dtype": dtype}
    return path


@dataclass
class Journal:
    """What edits overwrote, to put back with ``restore``: inside ``with journal:``, each
    weight's first write through ``writable`` keeps the original (a resident weight's values
    on the CPU, an offloaded weight's map or index entry, whose file is never touched)."""

    _resident: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _slots: list[tuple[_Slot, object]] = field(default_factory=list)
    _seen: set[int | tuple[int, str]] = field(default_factory=set)
    _files: list[Path] = field(default_factory=list)
    _tokens: list = field(default_factory=list)

    def keep(self, param: torch.Tensor, slot: _Slot | None) -> None:
        if slot is None:
            if id(param) not in self._seen:
                self._seen.add(id(param))
                self._resident.append((param, param.detach().to("cpu", copy=True)))
            return
        mark = (id(slot.store), slot.key)
        if mark not in self._seen:
            self._seen.add(mark)
            table = slot.index if slot.index is not None else slot.store
            self._slots.append((slot, table[slot.key]))

    def __len__(self) -> int:
        return len(self._resident) + len(self._slots)

    def __enter__(self) -> Journal:
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded weight back as it was before the first edit, and forget them."""
        for param, original in self._resident:
            param.copy_(original)
        for slot, original in self._slots:
            table = slot.index if slot.index is not None else slot.store
            table[slot.key] = original
        for path in self._files:
            path.unlink(missing_ok=True)
        self._resident, self._slots, self._seen, self._files = [], [], set(), []


_ACTIVE: ContextVar[Journal | None] = ContextVar("pyattr_journal", default=None)


@contextmanager
def writable(
    layer: LinearLayer, device: torch.device | str | None = None, *, model: nn.Module | None = None
) -> Iterator[torch.Tensor]:
    """W as a real (d_out, d_in) tensor on ``device`` (default: where the layer computes), to
    edit in place; on exit it is written back where the weight lives (see the module's
    docstring). ``model``: the model the layer belongs to, whose edit folder disk weights use.
    The active journal (``with journal:``) records the original first. A weight edited through
    a copy (offloaded, or on another device) is not written back if the body raises; a
    resident weight on ``device`` is the tensor edited."""
    param = layer.module.weight
    slot = _slot(layer.module)
    where = _where(layer, slot, device)
    journal = _ACTIVE.get()
    if journal is not None:
        journal.keep(param, slot)
    if slot is None and param.device == where:
        with torch.no_grad():
            yield layer.relayout(param)
        return
    native = (param if slot is None else slot.load()).detach()
    work = native.to(where, copy=True)
    with torch.no_grad():
        yield layer.relayout(work)
        if slot is None:
            param.copy_(work)
        elif slot.index is None:
            slot.store[slot.key] = work.to(device=native.device, dtype=native.dtype)
        else:
            folder = _edit_folder(model, slot)
            before = slot.index[slot.key].get("safetensors_file")
            path = _write_disk(slot, work.to(dtype=native.dtype), folder)
            # the file this write replaced goes when it is pyattr's and no journal keeps it as
            # an original (one the active journal made itself is replaced, not kept)
            old = Path(before) if before else None
            mine = old is not None and old.parent == folder
            if mine and (journal is None or old in journal._files):
                old.unlink(missing_ok=True)
                if journal is not None:
                    journal._files.remove(old)
            if journal is not None:
                journal._files.append(path)
