"""Named entries of one kind (score methods, edits), kept in the order they were registered."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry map whose entries carry their own ``name``; ``what`` names the kind in
    errors ("score method must be one of [...]")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add an entry (its name must be new); returns it."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self._entries:
            raise ValueError(f"a {self.what} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self.what} must be one of {self.names()}, got {name!r}") from None

    def pop(self, name: str) -> T | None:
        """Remove an entry (for tests and plug-ins that register one for a while)."""
        return self._entries.pop(name, None)
