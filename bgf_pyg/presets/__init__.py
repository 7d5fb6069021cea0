"""The originals' training configurations as data: one TOML file per (method, dataset).

Each file sets ``bgf-train`` options by their long names with ``_`` for ``-`` (``lr = 3e-5`` for
``--lr``), every value commented with its source. :func:`load_preset` reads one with the standard
library's TOML reader; :func:`check_preset` validates its keys and types against the CLI's parser,
so a preset can only name real options. Explicit command-line options override a preset.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from typing import Any

from ..checks import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a conditional dependency)
    import tomli as tomllib

SUFFIX = ".toml"
#: Options a preset may not set: they choose presets or say where this run lives.
NOT_PRESETTABLE = frozenset({"help", "preset", "list_presets", "resume", "out", "data_root"})


def _files():
    return resources.files(__name__)


def available_presets() -> list[str]:
    """Names of the shipped presets (``bgformer-cub``, ...), sorted."""
    return sorted(f.name[: -len(SUFFIX)] for f in _files().iterdir()
                  if f.name.endswith(SUFFIX))


def preset_title(name: str) -> str:
    """The first comment line of preset ``name`` (its one-line description)."""
    for line in (_files() / f"{name}{SUFFIX}").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(name: str) -> dict[str, Any]:
    """The options of preset ``name``; ``InputError`` for an unknown name (listing the valid
    ones) or a file that is not valid TOML."""
    names = available_presets()
    if name not in names:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    text = (_files() / f"{name}{SUFFIX}").read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"preset {name!r} is not valid TOML: {err}") from err


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type or str
    kind = getattr(convert, "kind", convert)  # bgf_pyg.options.Number declares its kind
    if isinstance(value, bool) or isinstance(value, dict | list):
        raise InputError(f"{where} must be a single {getattr(kind, '__name__', 'value')}, "
                         f"got {_kind(value)}")
    if kind is str and not isinstance(value, str):
        raise InputError(f"{where} must be a string, got {_kind(value)}")
    if kind in (int, float) and isinstance(value, str):
        raise InputError(f"{where} must be a number ({kind.__name__}), got {_kind(value)}")
    if kind is int and not isinstance(value, int):
        raise InputError(f"{where} must be an int, got {_kind(value)}")
    try:
        converted = convert(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise InputError(f"{where}: {err}") from err
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InputError(f"{where} must be one of {choices}, got {value!r}")
    return converted


def check_preset(
    preset: dict[str, Any], parser: argparse.ArgumentParser, name: str
) -> dict[str, Any]:
    """Validate ``preset`` against ``parser``'s options: every key an option a preset may set,
    every value of that option's type (flags: booleans; multi-value options: arrays). Returns the
    values converted as the parser would; raises ``InputError`` naming the preset and the key."""
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_PRESETTABLE}
    resolved = {}
    for key, value in preset.items():
        where = f"preset {name!r}: {key}"
        action = actions.get(key)
        if action is None:
            raise InputError(f"preset {name!r}: unknown key {key!r} (not a bgf-train option a "
                             "preset may set)")
        if action.nargs == 0:  # flags
            if not isinstance(value, bool):
                raise InputError(f"{where} must be true or false, got {_kind(value)}")
            resolved[key] = value
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            count = action.nargs if isinstance(action.nargs, int) else None
            if not isinstance(value, list) or (count is not None and len(value) != count):
                size = f"{count} values" if count else "values"
                raise InputError(f"{where} must be an array of {size}, got {_kind(value)}")
            resolved[key] = [_scalar(action, v, where) for v in value]
        else:
            resolved[key] = _scalar(action, value, where)
    return resolved
