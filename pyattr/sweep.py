"""A results table that grows one row per finished point and resumes after an interruption.

Rows go to ``results.jsonl`` (one JSON object per line, flushed as each point finishes) under a
first line that holds the sweep's configuration. Opening the same file with the same
configuration resumes: ``done(key)`` says which points are there already. A file made with
another configuration is never overwritten unless asked, so an interrupted or different run
cannot destroy complete results.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["ResultsTable"]

FORMAT = "pyattr.results/1"


def _digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class ResultsTable:
    """``results.jsonl`` of one sweep; ``rows`` holds what is there, in order."""

    def __init__(self, path: str | Path, config: dict, *, overwrite: bool = False) -> None:
        self.path, self.config, self.digest = Path(path), config, _digest(config)
        self.rows: list[dict] = []
        if self.path.exists() and not overwrite:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            try:
                header = json.loads(lines[0]) if lines else {}
            except json.JSONDecodeError:
                header = {}
            if header.get("digest") != self.digest:
                raise FileExistsError(
                    f"{self.path} holds the results of another configuration; choose another "
                    "output folder or pass overwrite (--overwrite) to replace them"
                )
            for line in lines[1:]:
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by an interruption: the point runs again
            self._rewrite()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        header = {"format": FORMAT, "digest": self.digest, "config": self.config}
        lines = [json.dumps(header)] + [json.dumps(r) for r in self.rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def done(self, key: str) -> dict | None:
        """The row of point ``key`` if it finished in this or an earlier run."""
        return next((r for r in self.rows if r.get("key") == key), None)

    def append(self, row: dict) -> None:
        """Add a finished point (it must carry a ``key``) and flush it to disk."""
        if "key" not in row:
            raise ValueError("a results row needs a 'key'")
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
