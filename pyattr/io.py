"""Files: atomic writes, tagged safetensors, fingerprints and one resumable record log.

Imports nothing of pyattr (but its version), so that every stage can write its results without
pulling in the others. Every file is written atomically (a temporary file in the same folder,
then a rename): an interrupted run never leaves a file that looks complete. Safetensors files
carry a ``format`` tag and the pyattr version in their metadata, and their header is written
with sorted keys, so the same content gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__

__all__ = [
    "RecordLog",
    "atomic_write",
    "cache_root",
    "config_digest",
    "fingerprint",
    "load_tensors",
    "meta_value",
    "save_tensors",
    "tensor_of",
    "weight_digest",
    "write_atomically",
]


def cache_root() -> Path:
    """``$PYATTR_CACHE``, else ``$XDG_CACHE_HOME/pyattr``, else ``~/.cache/pyattr``: where the
    toy model and fetched data sets live."""
    if os.environ.get("PYATTR_CACHE"):
        return Path(os.environ["PYATTR_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "pyattr"


def fingerprint(examples: Iterable) -> str:
    """A short hash of a data set's prompts and responses (anything with ``.prompt`` and
    ``.response`` strings, such as ``pyattr.data.Example``)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.prompt.encode())
        h.update(b"\0")
        h.update(ex.response.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def weight_digest(w: torch.Tensor) -> str:
    """Shape, dtype, sum and absolute sum of a tensor: tells whether a weight is still the one
    something was computed from (one read, no copy). Meta tensors digest their shape only."""
    blob = f"{tuple(w.shape)}{w.dtype}".encode()
    if w.device.type != "meta":
        with torch.no_grad():
            sums = torch.stack(
                [torch.sum(w, dtype=torch.float64), w.abs().sum(dtype=torch.float64)]
            )
        blob += sums.cpu().numpy().tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


STALE_S = 600  # a temporary file this old beside its target is a killed write's leftover


def _remove_stale(path: Path) -> None:
    """Remove what killed writes of ``path`` left (``.name.*.partial`` beside it, untouched for
    ``STALE_S`` seconds: a live writer keeps its file fresh)."""
    now = time.time()
    for old in path.parent.glob(f".{path.name}.*.partial"):
        try:
            if now - old.stat().st_mtime > STALE_S:
                old.unlink()
        except OSError:
            pass


def write_atomically(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(temporary path)``, then rename it to ``path``; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the mode any tool's file has
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write a file atomically (a temporary file in the same folder, then a rename)."""
    blob = data.encode() if isinstance(data, str) else data
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(blob))


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, *, format: str, metadata: dict
) -> Path:
    """Write ``tensors`` as safetensors, atomically, with ``format`` and the pyattr version in
    the metadata (values are stored as strings)."""
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": format, "pyattr": __version__}
    meta |= {k: str(v) for k, v in metadata.items()}

    def write(tmp: str) -> None:
        save_file(payload, tmp, metadata=meta)
        _sort_header(tmp)

    return write_atomically(path, write)


def _sort_header(path: str) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length:
    safetensors writes the metadata in hash-map order, which differs from run to run, so the
    same statistics would otherwise never give the same bytes twice."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        blob = text.encode()
        if len(blob) > length:  # cannot happen for the same content; never corrupt a file
            return
        f.seek(8)
        f.write(blob + b" " * (length - len(blob)))


def load_tensors(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by ``save_tensors`` with that format; a missing
    file, a file that is not safetensors, or another format is a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a foreign file
        message = f"{path} is not a {expected_format} file (not safetensors: {exc})"
        raise ValueError(message) from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != expected_format:
            raise ValueError(
                f"{path} is not a {expected_format} file (format: {meta.get('format')!r})"
            )
        # safe_open handles are not iterable: keys() is their API.
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118


def meta_value(path: str | Path, meta: dict, key: str, kind: type, *, default=None):
    """Metadata ``key`` of a file, JSON-decoded when ``kind`` is dict or list; a missing key
    (without ``default``) or a value of another type is one error naming the file and key, so
    a hand-edited or foreign file is never a traceback."""
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{path}: metadata {key!r} is missing (a damaged or foreign file)")
    raw = meta[key]
    try:
        value = json.loads(raw) if kind in (dict, list) else kind(raw)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: metadata {key!r} is not a valid {kind.__name__}") from None
    if not isinstance(value, kind):
        raise ValueError(
            f"{path}: metadata {key!r} is a {type(value).__name__}, not a {kind.__name__}"
        )
    return value


def all_finite(t: torch.Tensor, rows: int = 1024) -> bool:
    """Whether ``t`` holds no NaN or Inf, without the copies ``torch.isfinite`` makes of the
    whole tensor (|t| and boolean masks: several GiB for a 70B model's covariances): one sum
    finds any, and only a non-finite sum is confirmed block by block (a finite tensor whose
    sum overflows is finite)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    with torch.no_grad():
        if bool(torch.isfinite(t.sum())):
            return True
        flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        return all(
            bool(torch.isfinite(flat[k : k + rows]).all()) for k in range(0, len(flat), rows)
        )


def tensor_of(path: str | Path, tensors: dict, key: str, *, finite: bool = True) -> torch.Tensor:
    """A tensor the file's metadata promises; missing, or NaN/Inf where values must be finite,
    is one error naming the file and the tensor."""
    if key not in tensors:
        raise ValueError(f"{path}: no tensor {key!r} (a damaged or foreign file)")
    t = tensors[key]
    if finite and not all_finite(t):
        raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf")
    return t


def config_digest(config: dict) -> str:
    """A short hash of a JSON-able configuration (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


_held: dict[str, list] = {}  # lock file → [open handle, how many logs of this process hold it]


class _Lock:
    """An exclusive lock on a hidden ``.NAME.lock`` file beside the log, shared by the logs one
    process opens on the same path (counted) and refused to any other process while held. The
    file stays (deleting a lock file races with a process about to take it); it is hidden so
    that a finished folder does not look unfinished."""

    def __init__(self, path: Path) -> None:
        self.name = str(path.with_name(f".{path.name}.lock").resolve())
        held = _held.get(self.name)
        if held is not None:
            held[1] += 1
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux or macOS: no lock
            _held[self.name] = [None, 1]
            return
        handle = open(self.name, "a+")  # noqa: SIM115 (held open while the lock is)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FileExistsError(
                f"{path} is being written by another run right now; wait for it to finish or "
                "choose another output folder"
            ) from None
        _held[self.name] = [handle, 1]

    def close(self) -> None:
        held = _held.get(self.name)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[self.name]
            if held[0] is not None:
                held[0].close()  # closing the file releases the lock


def read_log(path: str | Path) -> tuple[dict, list[dict]]:
    """The header and records of a JSONL log. A last line cut short by an interruption is
    dropped (that work runs again); a broken line with records after it is an error naming
    the file and the line, since dropping it would drop them too."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(
                    f"{path}: line {number} is not JSON ({exc.msg}) and records follow it; "
                    "repair or remove that line"
                ) from None
            break
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        parsed.append(record)
    return (parsed[0] if parsed else {}), parsed[1:]


class RecordLog:
    """A resumable JSONL log: a header line ``{format, digest, config}``, then one record per
    line, each appended and flushed as soon as it exists.

    Opening a log that holds the same configuration (same digest) resumes it: ``records`` are
    what earlier runs finished, a line cut short by an interruption is dropped, and the file is
    rewritten (atomically) without it. A log of another configuration is replaced with
    ``mismatch="replace"`` or refused with ``mismatch="raise"`` (``FileExistsError``, naming
    the way out); ``resume=False`` starts afresh whatever the file holds. ``digest``: what
    identifies the configuration, by default its hash.
    """

    def __init__(
        self,
        path: str | Path,
        config: dict,
        *,
        format: str,
        digest: str | None = None,
        mismatch: str = "raise",
        resume: bool = True,
    ) -> None:
        if mismatch not in ("raise", "replace"):
            raise ValueError(f"mismatch must be 'raise' or 'replace', got {mismatch!r}")
        self.path, self.config, self.format = Path(path), config, format
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: _Lock | None = _Lock(self.path)
        self.digest = digest if digest is not None else config_digest(config)
        self.records: list[dict] = []
        if resume and self.path.exists():
            try:
                header, records = self._read()
            except ValueError:
                self.close()
                raise
            if header.get("digest") == self.digest:
                self.records = records
            elif mismatch == "raise":
                self.close()
                raise FileExistsError(
                    f"{self.path} holds the results of another configuration; choose another "
                    "output folder or pass overwrite (--overwrite) to replace them"
                )
        header = {"format": format, "digest": self.digest, "config": config}
        lines = [json.dumps(header)] + [json.dumps(r) for r in self.records]
        atomic_write(self.path, "\n".join(lines) + "\n")

    def _read(self) -> tuple[dict, list[dict]]:
        return read_log(self.path)

    def close(self) -> None:
        """Let another run open this log (the lock also goes when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def retain(self, keep: Callable[[dict], bool]) -> None:
        """Keep only the records ``keep`` accepts, rewriting the file atomically (work found
        incomplete on resume runs again)."""
        self.records = [r for r in self.records if keep(r)]
        header = {"format": self.format, "digest": self.digest, "config": self.config}
        lines = [json.dumps(header)] + [json.dumps(r) for r in self.records]
        atomic_write(self.path, "\n".join(lines) + "\n")

    def append(self, records: Iterable[dict]) -> None:
        """Add finished records and flush them to disk."""
        new = list(records)
        self.records += new
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
            f.flush()
