"""Named entries of one kind (methods, losses, datasets): the one place a name is declared.

A :class:`Registry` maps each name to its entry (a small frozen dataclass saying what the named
thing is and how to build it). Everything that lists or checks names (the configuration's
choices, scopes and defaults, the command line's help, the builders) reads the registry at the
time it runs, so an entry registered by a user's own module is a choice everywhere::

    from bgf_pyg.models import METHODS, MethodEntry
    METHODS.register("mine", MethodEntry(MyMethod, options={"k": "k"}, balanced=True))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries of one ``kind`` by name, in the order registered; one of them is the default
    (``register(..., default=True)``; else the first).

    Iterating yields the names, ``name in registry`` tests one, ``registry[name]`` is its entry
    (``ValueError`` naming the known ones otherwise), so a registry can stand wherever a tuple
    of names did (argparse's ``choices``, ``pytest.mark.parametrize``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._default: str | None = None

    def register(self, name: str, entry: Entry, *, replace: bool = False,
                 default: bool = False) -> Entry:
        """Add ``entry`` as ``name`` (the default name with ``default``); a name already taken
        is a ``ValueError`` unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to "
                             "replace it")
        self._entries[name] = entry
        if default:
            self._default = name
        return entry

    def unregister(self, name: str) -> Entry:
        """Remove ``name`` (a test's own entry, say) and return its entry."""
        self[name]  # noqa: B018 - the error for an unknown name
        if name == self._default:
            raise ValueError(f"{self.kind} {name!r} is the default; it cannot be removed")
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of "
                             f"{', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())

    def names(self, **required: object) -> tuple[str, ...]:
        """The names whose entries have every ``required`` attribute value, e.g.
        ``METHODS.names(balanced=True)``."""
        return tuple(name for name, entry in self._entries.items()
                     if all(getattr(entry, key) == value for key, value in required.items()))

    def declaring(self, option: str) -> tuple[str, ...]:
        """The names whose entries declare ``option`` among their ``options`` (what a method,
        a loss or a backbone reads), e.g. ``BACKBONES.declaring("pretrained")``."""
        return tuple(name for name, entry in self._entries.items() if option in entry.options)

    def view(self, attribute: str) -> Mapping[str, Any]:
        """A live read-only mapping: name → its entry's ``attribute``, for the entries where it
        is set (not empty or ``None``)."""
        return _View(self, attribute)

    @property
    def default(self) -> str:
        """The name registered with ``default=True`` (else the first)."""
        return self._default or next(iter(self._entries))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


class _View(Mapping):
    """:meth:`Registry.view`: every access reads the registry as it is then."""

    def __init__(self, registry: Registry, attribute: str) -> None:
        self._registry, self._attribute = registry, attribute

    def _values(self) -> dict[str, Any]:
        values = ((name, getattr(entry, self._attribute)) for name, entry in self._registry.items())
        return {name: value for name, value in values if value is not None and value != {}}

    def __getitem__(self, name: str) -> Any:
        return self._values()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())
