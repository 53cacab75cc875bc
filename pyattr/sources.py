"""The paper's data sets: where each is published, its format, its license, and a fetch that
verifies what it downloads (``pyattr data fetch NAME``).

pyattr ships no third-party data. ``fetch`` downloads a published file into the cache
(``$PYATTR_CACHE/data``, see ``pyattr.io.cache_root``), streaming it to a temporary file while
hashing it; a download that is cut short (fewer bytes than the server announced), that fails,
or whose SHA-256 differs from the pinned one is deleted, never kept. Only a verified file is
converted (AdvBench's CSV is kept as it is; the Alpaca JSON becomes prompt/response pairs with
the refusal rows removed; the released code's GCG suffixes are read out of its source) and
renamed into place, so a file in the cache is always complete.

Checksums: an entry's ``sha256`` pins the published bytes. Where none is pinned (the built-in
entries: this package was written on machines that cannot reach the publishers), the first
verified fetch records the digest beside the file (``FILE.source.json``, with the digest of the
converted file), every later fetch is checked against it and every use against the kept file's
digest; ``--sha256`` demands a digest of your own. Offline, ``--data-dir``
or a path given to a command is used as it is, and a missing file is one message that names
each file and where to put it.

Downloads go to the published addresses; ``--mirror URL`` (or ``$PYATTR_DATA_MIRROR``) fetches
``URL/<file name>`` instead, and Hub entries honour ``$HF_ENDPOINT``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import http.client
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write, cache_root

__all__ = [
    "REGISTRY",
    "DataMissingError",
    "FetchError",
    "Source",
    "data_dir",
    "fetch",
    "find",
    "load_registry",
    "listing",
    "path_of",
    "verify",
]

HF = "https://huggingface.co"


class FetchError(RuntimeError):
    """A download failed, was cut short or did not match its checksum; nothing was kept."""


class DataMissingError(FileNotFoundError):
    """A data set is neither in the cache nor in the data folder given."""


@dataclass(frozen=True)
class Source:
    """One published data set."""

    name: str
    used_as: str  # prompts, safety pairs, utility pairs, suffixes
    description: str
    url: str | None  # the published file; None: not published (``how`` says how to make it)
    filename: str  # the file as pyattr keeps it
    format: str
    license: str
    sha256: str | None = None  # of the published bytes; None: pinned on the first fetch
    columns: tuple[str, ...] = ()  # checked after conversion (CSV files)
    rows: int | None = None  # expected rows after conversion, where known
    convert: str | None = None  # a name in CONVERTERS
    how: str = ""  # for unpublished entries: the command that makes it

    def source_url(self, mirror: str | None = None) -> str:
        if self.url is None:
            raise DataMissingError(f"{self.name} is not published: {self.how}")
        mirror = mirror or os.environ.get("PYATTR_DATA_MIRROR")
        if mirror:
            return f"{mirror.rstrip('/')}/{self.url.rsplit('/', 1)[-1]}"
        endpoint = os.environ.get("HF_ENDPOINT")
        if endpoint and self.url.startswith(HF):
            return endpoint.rstrip("/") + self.url[len(HF) :]
        return self.url


REGISTRY: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "advbench",
            "prompts",
            "AdvBench harmful behaviors (Zou et al., 2023): the paper's 520 harmful prompts "
            "(the released code evaluates the first 100)",
            "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/"
            "harmful_behaviors.csv",
            "advbench.csv",
            "CSV with columns goal, target",
            "MIT (llm-attacks repository)",
            columns=("goal", "target"),
            rows=520,
        ),
        Source(
            "safety-short",
            "safety pairs",
            "the released code's short safety calibration set: harmful prompts with "
            "Llama-2-7b-chat's own refusals (the only safety set the release contains)",
            "https://raw.githubusercontent.com/boyiwei/alignment-attribution-code/main/data/"
            "SFT_aligned_llama2-7b-chat-hf_train_short.csv",
            "safety-short.csv",
            "CSV with columns prompt ([INST]-wrapped), response",
            "MIT (alignment-attribution-code repository)",
            columns=("prompt", "response"),
        ),
        Source(
            "safety",
            "safety pairs",
            "the paper's full safety calibration set (SFT_aligned_llama2-7b-chat-hf_train.csv): "
            "named by the released code but missing from its repository",
            None,
            "safety.csv",
            "CSV with columns prompt, response",
            "-",
            how="make one from the model under study: pyattr data safety --model M "
            "--prompts PROMPTS --out safety.csv (the paper made its set with Llama-2-chat)",
        ),
        Source(
            "alpaca-no-safety",
            "utility pairs",
            "Alpaca-cleaned instructions with the rows that refuse or apologise removed: the "
            "paper's utility set (alpaca_cleaned_no_safety, not in the release) rebuilt by "
            "pyattr's filter",
            f"{HF}/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json",
            "alpaca-no-safety.csv",
            "JSON list of {instruction, input, output}, kept as CSV with columns prompt, response",
            "CC BY 4.0 (as listed on the Hub), derived from Stanford Alpaca's data (CC BY-NC 4.0)",
            columns=("prompt", "response"),
            convert="alpaca_no_safety",
        ),
        Source(
            "gcg-suffixes",
            "suffixes",
            "the three GCG adversarial suffixes of the paper's Adv-Suffix attack, read out of "
            "the released code's prompt_utils.py",
            "https://raw.githubusercontent.com/boyiwei/alignment-attribution-code/main/lib/"
            "prompt_utils.py",
            "gcg-suffixes.json",
            "Python source; kept as a JSON list of strings",
            "MIT (alignment-attribution-code repository)",
            rows=3,
            convert="gcg_suffixes",
        ),
    ]
}

# Refusal openings that mark an Alpaca row as safety-related (the released phrases that only a
# refusal uses: "However", "illegal" or "Hello!" also occur in ordinary answers).
SAFETY_ROW_PHRASES = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "My apologies",
    "As an AI",
    "As a language model",
    "I cannot",
    "I can't",
    "I'm not able to",
    "I am not able to",
    "I'm unable to",
    "I am unable to",
)


def _csv(rows: Iterable[dict], columns: tuple[str, ...]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _alpaca_no_safety(raw: bytes, source: Source) -> bytes:
    rows = json.loads(raw.decode("utf-8-sig"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FetchError(f"{source.name}: expected a JSON list of objects")
    kept = []
    for row in rows:
        missing = {"instruction", "output"} - row.keys()
        if missing:
            raise FetchError(f"{source.name}: a row lacks {sorted(missing)}")
        output = row["output"]
        if any(phrase in output for phrase in SAFETY_ROW_PHRASES):
            continue
        extra = (row.get("input") or "").strip()
        prompt = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
        kept.append({"prompt": prompt, "response": output})
    return _csv(kept, source.columns)


def _gcg_suffixes(raw: bytes, source: Source) -> bytes:
    """The string list assigned to ``gcg_list`` in the released code, read with ``ast``
    (nothing of it is run)."""
    try:
        tree = ast.parse(raw.decode("utf-8"))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise FetchError(f"{source.name}: not Python source: {exc}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "gcg_list" for t in node.targets
        ):
            try:
                suffixes = ast.literal_eval(node.value)
            except ValueError:
                break
            if isinstance(suffixes, list) and all(isinstance(s, str) for s in suffixes):
                return (json.dumps(suffixes, ensure_ascii=False, indent=1) + "\n").encode()
    raise FetchError(f"{source.name}: no list of strings named gcg_list in the file")


CONVERTERS: dict[str, Callable[[bytes, Source], bytes]] = {
    "alpaca_no_safety": _alpaca_no_safety,
    "gcg_suffixes": _gcg_suffixes,
}


def data_dir() -> Path:
    """Where fetched data sets are cached: ``cache_root() / "data"``."""
    return cache_root() / "data"


def load_registry(path: str | Path | None = None) -> dict[str, Source]:
    """The built-in registry, extended (or overridden by name) by a JSON file of entries with
    the fields of ``Source``: how a lab adds its own mirrored or private data sets."""
    registry = dict(REGISTRY)
    if path is None:
        return registry
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the data registry {path}: {exc}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a data registry is a JSON list of entries")
    fields = set(Source.__dataclass_fields__)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "filename"} <= entry.keys():
            raise ValueError(f"{path}: entry {i} needs at least 'name' and 'filename'")
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown fields {sorted(unknown)}")
        entry = {"used_as": "", "description": "", "url": None, "format": "", "license": ""} | entry
        entry["columns"] = tuple(entry.get("columns", ()))
        registry[entry["name"]] = Source(**entry)
    return registry


def find(name: str, registry: dict[str, Source] | None = None) -> Source:
    registry = registry if registry is not None else REGISTRY
    if name not in registry:
        raise ValueError(f"no data set {name!r}; the registry has {', '.join(sorted(registry))}")
    return registry[name]


def _record_path(folder: Path, source: Source) -> Path:
    return folder / f"{source.filename}.source.json"


def _record(folder: Path, source: Source) -> dict:
    """What the fetch that made ``source``'s file recorded (url, sha256 of the published bytes,
    file_sha256 of the kept file); {} where there is none."""
    path = _record_path(folder, source)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: unreadable fetch record ({exc}); remove it and fetch again"
        ) from None
    return record if isinstance(record, dict) else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, source: Source) -> Path:
    """``path`` unchanged since its fetch (the kept file's recorded digest), or an error."""
    want = _record(path.parent, source).get("file_sha256")
    if want is not None and _sha256(path) != want:
        raise ValueError(
            f"{path} changed since it was fetched (SHA-256 differs from the record): fetch it "
            f"again with `pyattr data fetch {source.name} --force`"
        )
    return path


def _download(url: str, source: Source, tmp: Path, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``tmp`` (written as it arrives); return its SHA-256. A short read
    is an error."""
    from tqdm.auto import tqdm

    digest, got, expected = hashlib.sha256(), 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            expected = response.headers.get("Content-Length")
            total = int(expected) if expected is not None else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=source.name, disable=not progress
            ) as bar:
                while chunk := response.read1(1 << 20):
                    out.write(chunk)
                    out.flush()
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead:
        raise FetchError(
            f"{source.name}: the download from {url} was cut short ({got} of {expected} bytes)"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{source.name}: cannot download {url}: {reason}") from None
    if expected is not None and got != int(expected):
        raise FetchError(
            f"{source.name}: the download from {url} was cut short ({got} of {expected} bytes)"
        )
    return digest.hexdigest()


def _remove_dead_downloads(folder: Path, source: Source) -> None:
    """Temporary files of downloads whose process died (killed mid-download): never data."""
    for tmp in folder.glob(f".{source.filename}.download-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            continue


def _check_converted(blob: bytes, source: Source) -> None:
    if source.columns:
        reader = csv.DictReader(io.StringIO(blob.decode("utf-8-sig")))
        header = reader.fieldnames or []
        missing = [c for c in source.columns if c not in header]
        if missing:
            raise FetchError(f"{source.name}: no column {missing}; the columns are {header}")
        rows = sum(1 for _ in reader)
    elif source.filename.endswith(".json"):
        rows = len(json.loads(blob))
    else:
        return
    if source.rows is not None and rows != source.rows:
        raise FetchError(f"{source.name}: {rows} rows, the published set has {source.rows}")


def fetch(
    name: str,
    *,
    folder: str | Path | None = None,
    mirror: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    registry: dict[str, Source] | None = None,
    timeout: float = 60.0,
    progress: bool = False,
) -> Path:
    """Download ``name`` into ``folder`` (default ``data_dir()``), verify and convert it, and
    return its path. Already there (and matching its pin): returned as it is, unless ``force``."""
    source = find(name, registry)
    folder = Path(folder) if folder is not None else data_dir()
    target = folder / source.filename
    record = _record(folder, source)
    want = sha256 or source.sha256 or record.get("sha256")
    if target.is_file() and not force:
        return verify(target, source)
    url = source.source_url(mirror)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_dead_downloads(folder, source)
    tmp = folder / f".{source.filename}.download-{os.getpid()}"
    try:
        got = _download(url, source, tmp, timeout, progress)
        if want is not None and got != want:
            by = (
                "asked for"
                if sha256
                else "pinned in the registry"
                if source.sha256
                else f"recorded at its first fetch in {_record_path(folder, source)}"
            )
            raise FetchError(
                f"{source.name}: the file from {url} has SHA-256 {got}, not the {want} {by}: "
                "the publisher changed it or the download is not the data set"
            )
        raw = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    blob = CONVERTERS[source.convert](raw, source) if source.convert else raw
    _check_converted(blob, source)
    record = {"name": source.name, "url": url, "sha256": got}
    record["file_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write(target, blob)
    atomic_write(_record_path(folder, source), json.dumps(record, indent=1) + "\n")
    return target


def path_of(
    name: str, data_dir_: str | Path | None = None, registry: dict[str, Source] | None = None
) -> Path:
    """Where data set ``name`` is: in ``data_dir_`` if given, else in the cache. Missing: one
    error that names the file, where to put it and how to fetch it."""
    source = find(name, registry)
    places = [Path(data_dir_)] if data_dir_ is not None else []
    places.append(data_dir())
    for place in places:
        if (place / source.filename).is_file():
            return verify(place / source.filename, source)
    raise DataMissingError(missing_message([source], places))


def missing_message(sources: Iterable[Source], places: list[Path]) -> str:
    """Each missing file with where it comes from and where to put it."""
    lines = ["these data sets are not on this machine:"]
    for s in sources:
        origin = f"published at {s.url}" if s.url else s.how
        lines.append(f"  {s.name}: {s.filename} ({origin})")
    where = " or ".join(str(p) for p in places)
    lines.append(
        f"fetch them with `pyattr data fetch NAME` when online, or put the files in {where} "
        "(--data-dir DIR points at a folder of your own)"
    )
    return "\n".join(lines)


@dataclass
class Listing:
    """One row of ``pyattr data list``: the entry, its file if fetched, its pinned digest."""

    source: Source
    path: Path | None
    sha256: str | None


def listing(folder: str | Path | None = None, registry=None) -> list[Listing]:
    folder = Path(folder) if folder is not None else data_dir()
    rows = []
    for source in (registry or REGISTRY).values():
        path = folder / source.filename
        pinned = source.sha256 or _record(folder, source).get("sha256")
        rows.append(Listing(source, path if path.is_file() else None, pinned))
    return rows
