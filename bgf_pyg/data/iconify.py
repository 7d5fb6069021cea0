"""Icon sets in the Iconify JSON format, as the npm registry's ``@iconify-json/*`` packages ship
them.

A package tarball holds ``package/package.json`` (name, version, licence) and
``package/icons.json``: ``icons[name]`` with an SVG ``body`` and optional ``width``, ``height``,
``left``, ``top`` and ``hidden`` (a deprecated name kept for old users), the set-wide defaults of
those fields, and ``aliases[name]`` pointing at a ``parent`` icon, optionally flipped (``hFlip``,
``vFlip``) or turned (``rotate``, in quarter turns). :func:`read_icon_set` resolves every alias
into a :class:`Drawing`; :func:`svg_document` turns a drawing into a standalone SVG.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

#: The skin-tone suffixes of sets that spell them as one word (``man-deaf-dark``).
TONE_SUFFIXES = ("light", "medium-light", "medium", "medium-dark", "dark")
_SKIN_TONE = re.compile(r"(^|-)(skin-tone|tone[1-5])(-|$)")
#: Iconify's default size when neither the icon nor the set gives one.
DEFAULT_SIDE = 16


@dataclass(frozen=True)
class Drawing:
    """One icon's SVG ``body`` in the box ``(left, top, width, height)``, flipped and turned by
    ``rotate`` quarter turns (clockwise) as its alias asks."""

    body: str
    width: float
    height: float
    left: float = 0.0
    top: float = 0.0
    h_flip: bool = False
    v_flip: bool = False
    rotate: int = 0


@dataclass
class IconSet:
    """The visible icons of one package, aliases resolved.

    Attributes:
        prefix: the set's name (``noto``). package, version, license: from ``package.json``.
        drawings: every visible name (icons that are not ``hidden``, and aliases) and its
            drawing.
        aliases: each alias that is the same drawing as its parent (no flip, no turn) and that
            parent's name: two names of one icon.
    """

    prefix: str
    package: str
    version: str
    license: str
    drawings: dict[str, Drawing] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def normalise_name(name: str) -> str:
    """``name`` in lowercase alphanumerics only (``Grinning-Face`` and ``grinningface`` match)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_skin_tone_variant(name: str, names: set[str] | frozenset[str]) -> bool:
    """Whether ``name`` is a skin-tone variant of another icon of its set (``names``).

    Spelled ``...-skin-tone...`` (Noto, Twemoji, OpenMoji) or ``...-tone1`` to ``-tone5``
    (Noto's old names), or, as Fluent does, a base name plus one of :data:`TONE_SUFFIXES` where
    the set draws the base with all five (``police-car-light`` is kept: ``police-car`` has no
    tones)."""
    if _SKIN_TONE.search(name):
        return True
    for suffix in TONE_SUFFIXES:
        base = name.removesuffix(f"-{suffix}")
        if base != name and all(f"{base}-{tone}" in names for tone in TONE_SUFFIXES):
            return base in names
    return False


def lost_its_stylesheet(body: str) -> bool:
    """Whether an SVG ``body`` colours its shapes by CSS class without the ``<style>`` that
    defines them (such an icon renders as a black silhouette)."""
    return "class=" in body and "<style" not in body


def _read_json(archive: tarfile.TarFile, member: str, tarball: Path) -> dict:
    try:
        file = archive.extractfile(member)
    except KeyError:
        raise ValueError(f"{tarball}: expected {member} in the package") from None
    if file is None:
        raise ValueError(f"{tarball}: {member} is not a file")
    try:
        data = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{tarball}: {member} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{tarball}: {member} must hold a JSON object")
    return data


def _box(entry: dict, defaults: dict) -> dict:
    return {key: float(entry.get(key, defaults.get(key, default)))
            for key, default in (("width", DEFAULT_SIDE), ("height", DEFAULT_SIDE),
                                 ("left", 0), ("top", 0))}


def _resolve(name: str, icons: dict, aliases: dict, defaults: dict, tarball: Path) -> Drawing:
    """The drawing of ``name``: an icon, or an alias chain ending at one (flips and turns of the
    links compose; an alias's own box fields override its parent's)."""
    chain, seen = [], set()
    while name in aliases:
        if not isinstance(aliases[name], dict):
            raise ValueError(f"{tarball}: alias {name!r} must be an object with a 'parent'")
        if name in seen:
            raise ValueError(f"{tarball}: the alias {name!r} refers back to itself")
        seen.add(name)
        chain.append(aliases[name])
        name = aliases[name].get("parent")
    if name not in icons:
        raise ValueError(f"{tarball}: an alias points at {name!r}, which is not an icon")
    icon = icons[name]
    if not isinstance(icon, dict) or not isinstance(icon.get("body"), str):
        raise ValueError(f"{tarball}: icon {name!r} has no SVG body")
    box = _box(icon, defaults)
    h_flip, v_flip, rotate = bool(icon.get("hFlip")), bool(icon.get("vFlip")), icon.get("rotate", 0)
    for link in reversed(chain):
        box.update(_box(link, box))
        h_flip ^= bool(link.get("hFlip"))
        v_flip ^= bool(link.get("vFlip"))
        rotate += link.get("rotate", 0)
    return Drawing(icon["body"], h_flip=h_flip, v_flip=v_flip, rotate=int(rotate) % 4, **box)


def read_icon_set(tarball: str | Path) -> IconSet:
    """The :class:`IconSet` of an ``@iconify-json`` package tarball (as ``npm pack`` writes it),
    without the icons that :func:`lost_its_stylesheet`; a malformed package raises a
    ``ValueError`` naming the tarball."""
    tarball = Path(tarball)
    try:
        with tarfile.open(tarball) as archive:
            package = _read_json(archive, "package/package.json", tarball)
            data = _read_json(archive, "package/icons.json", tarball)
    except tarfile.TarError as error:
        raise ValueError(f"{tarball} is not a package tarball ({error})") from None
    icons, aliases = data.get("icons"), data.get("aliases", {})
    if not isinstance(icons, dict) or not isinstance(aliases, dict):
        raise ValueError(f"{tarball}: icons.json needs an 'icons' object (and 'aliases' an object)")
    icon_set = IconSet(prefix=str(data.get("prefix", package.get("name", tarball.stem))),
                       package=str(package.get("name", "")),
                       version=str(package.get("version", "")),
                       license=str(package.get("license", "")))
    visible = [n for n, icon in icons.items()
               if not (isinstance(icon, dict) and icon.get("hidden"))] + list(aliases)
    for name in visible:
        drawing = _resolve(name, icons, aliases, data, tarball)
        if lost_its_stylesheet(drawing.body):
            continue
        icon_set.drawings[name] = drawing
        link = aliases.get(name, {})
        if name in aliases and not (link.get("hFlip") or link.get("vFlip") or link.get("rotate")):
            icon_set.aliases[name] = link["parent"]
    return icon_set


def svg_document(drawing: Drawing, size: int) -> str:
    """A standalone SVG of ``drawing`` rendered ``size`` × ``size`` (a box that is not square is
    centred, keeping its aspect ratio): flips, then the turn about the box's centre."""
    body = drawing.body
    left, top, width, height = drawing.left, drawing.top, drawing.width, drawing.height
    if drawing.h_flip or drawing.v_flip:  # x -> 2·left + width - x, y likewise
        sx, sy = (-1 if drawing.h_flip else 1), (-1 if drawing.v_flip else 1)
        dx = 2 * left + width if drawing.h_flip else 0
        dy = 2 * top + height if drawing.v_flip else 0
        body = f'<g transform="matrix({sx} 0 0 {sy} {dx:g} {dy:g})">{body}</g>'
    if drawing.rotate:
        cx, cy = left + width / 2, top + height / 2
        body = f'<g transform="rotate({90 * drawing.rotate} {cx:g} {cy:g})">{body}</g>'
        if drawing.rotate % 2:
            left, top, width, height = cx - height / 2, cy - width / 2, height, width
    return (f'<svg xmlns="http://www.w3.org/2000/svg" '
            f'xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left:g} {top:g} {width:g} {height:g}" width="{size}" height="{size}">'
            f"{body}</svg>")
