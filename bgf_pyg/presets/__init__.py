"""The originals' training configurations as data: one TOML file per (method, dataset).

Each file sets fields of :class:`~bgf_pyg.config.Config` (``bgf-train``'s options with ``_`` for
``-``: ``lr = 3e-5`` for ``--lr``), every value commented with its source. :func:`load_preset`
reads one with the standard library's TOML reader; :func:`bgf_pyg.config.check_preset` checks
its keys and values against the options' declarations, so a preset can only name real options.
Options given explicitly override a preset.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from ..checks import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a conditional dependency)
    import tomli as tomllib

SUFFIX = ".toml"


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
