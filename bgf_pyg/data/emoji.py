"""Emoji drawn by different designers: one emoji is one class, each emoji set one image of it.

``bgf-data emoji --root DIR`` (:mod:`bgf_pyg.prepare`) renders the sets once into ``DIR``:
``images/<class>/<set>.png`` (RGB on white) and ``manifest.jsonl``, one JSON object per image
(``path`` relative to ``DIR``, ``class``, ``style``: the set, ``icon``: its name in the set,
``package``, ``version``, ``license``, ``size``), then one per drawing that was left out, with
its reason under ``left_out`` and no ``path`` (:func:`read_left_out`: a drawing the renderer
could not draw, or an emoji that fell below ``--min-styles`` sets without it). The manifest is
written last, so a folder without it is an unfinished cache. This module reads the cache only:
neither npm nor an SVG renderer is needed to train on it.

Split: a seeded half of the classes trains, the other half is unseen at test. The class names
are sorted and permuted with the fixed seed :data:`EMOJI_SPLIT_SEED`; the first
``ceil(C / 2)`` train. The split depends only on the set of class names, never on the order of
the manifest or a run's ``--seed``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch

from bgf_pyg.data.base import ImageListDataset, check_split, reindex

MANIFEST = "manifest.jsonl"
IMAGES_DIR = "images"
#: Fields of every manifest record.
MANIFEST_FIELDS = ("path", "class", "style", "icon", "package", "version", "license", "size")
#: The field that marks a record of a drawing left out of the cache: why.
LEFT_OUT = "left_out"
#: Fields of a left-out record.
LEFT_OUT_FIELDS = (LEFT_OUT, "class", "style", "icon", "package", "version")
#: The default render side (pixels) of ``bgf-data emoji`` and the default ``--image-size`` of
#: ``bgf-train --dataset emoji``.
EMOJI_SIZE = 96
#: The seed of the train/test class split (fixed: every run sees the same split).
EMOJI_SPLIT_SEED = 0
PREPARE_COMMAND = "bgf-data emoji --root"


def prepare_hint(root: Path) -> str:
    """The command that (re)builds the cache at ``root``."""
    return f"run `{PREPARE_COMMAND} {root}` to prepare it"


def _manifest_records(root: str | Path) -> list[dict]:
    """Every record of ``root``'s manifest, images and left-out drawings. A missing root or
    manifest raises a ``FileNotFoundError``, a malformed line (not JSON, a field missing or of
    another type, an image path outside ``images/`` or listed twice) a ``ValueError``; both name
    the path and the command that prepares the cache."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder; {prepare_hint(root)}")
    file = root / MANIFEST
    if not file.is_file():
        state = "is a half-written cache" if (root / IMAGES_DIR).exists() else "is not prepared"
        raise FileNotFoundError(f"{root} has no {MANIFEST} (it {state}); {prepare_hint(root)}")
    records = []
    lines: dict[str, int] = {}  # each path's line
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        fields = LEFT_OUT_FIELDS if isinstance(record, dict) and LEFT_OUT in record else (
            MANIFEST_FIELDS)
        if not isinstance(record, dict) or any(key not in record for key in fields):
            raise ValueError(f"{file}, line {number}: expected a JSON object with the fields "
                             f"{', '.join(fields)}; {prepare_hint(root)}")
        if LEFT_OUT not in record:
            problem = record_problem(record)
            path = PurePosixPath(record["path"]).as_posix() if problem is None else ""
            if problem is None and path in lines:
                problem = f"path {record['path']!r} is listed on line {lines[path]} too"
            if problem is not None:
                raise ValueError(f"{file}, line {number}: {problem}; {prepare_hint(root)}")
            lines[path] = number
        records.append(record)
    return records


def read_manifest(root: str | Path) -> list[dict]:
    """The image records of ``root``'s manifest (errors as :func:`_manifest_records`; a
    manifest without images is a ``ValueError``)."""
    records = [r for r in _manifest_records(root) if LEFT_OUT not in r]
    if not records:
        raise ValueError(f"{Path(root) / MANIFEST} lists no images; {prepare_hint(Path(root))}")
    return records


def read_left_out(root: str | Path) -> list[dict]:
    """The drawings ``root``'s manifest lists as left out, each with its reason (``left_out``)."""
    return [r for r in _manifest_records(root) if LEFT_OUT in r]


def record_problem(record: dict) -> str | None:
    """What is wrong with a manifest record's values (``None``: nothing): text fields are
    strings, ``size`` a positive int, ``path`` a file under ``images/`` of the cache."""
    for key in MANIFEST_FIELDS:
        if key != "size" and not isinstance(record[key], str):
            return f"{key} must be a string, got {type(record[key]).__name__} {record[key]!r}"
    size = record["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"size must be a positive int, got {type(size).__name__} {size!r}"
    path = PurePosixPath(record["path"])
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (IMAGES_DIR,) \
            or len(path.parts) < 2:
        return f"path must be a file under {IMAGES_DIR}/ of the cache, got {record['path']!r}"
    return None


def emoji_split(class_names: list[str] | set[str]) -> tuple[list[str], list[str]]:
    """The sorted ``(train, test)`` class names: a permutation of the sorted names seeded with
    :data:`EMOJI_SPLIT_SEED`, its first ``ceil(C / 2)`` training."""
    names = sorted(set(class_names))
    generator = torch.Generator().manual_seed(EMOJI_SPLIT_SEED)
    order = torch.randperm(len(names), generator=generator).tolist()
    train = (len(names) + 1) // 2
    return sorted(names[i] for i in order[:train]), sorted(names[i] for i in order[train:])


class Emoji(ImageListDataset):
    """The emoji set prepared by ``bgf-data emoji``.

    Args:
        root: the folder ``bgf-data emoji --root`` wrote (``manifest.jsonl`` and ``images/``).
        split: ``"train"`` or ``"test"`` (:func:`emoji_split`).
        transform: applied to each RGB ``PIL.Image``.

    ``class_ids`` holds the class names (``grinningface``); ``styles`` the set of each image.
    """

    LAYOUT = (f"the folder `{PREPARE_COMMAND} DIR` writes ({MANIFEST} and {IMAGES_DIR}/, "
              f"{EMOJI_SIZE} px by default)")
    SPLIT = (f"a seeded half of the emoji train (sorted names, fixed seed {EMOJI_SPLIT_SEED}), "
             "the other half test")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        root = Path(root)
        check_split(split)
        records = read_manifest(root)
        missing = [r["path"] for r in records if not (root / r["path"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} of the {len(records)} images its "
                                    f"{MANIFEST} lists do not exist, e.g. {root / missing[0]} "
                                    f"(a half-written or altered cache); {prepare_hint(root)}")
        unlisted = sorted(set((root / IMAGES_DIR).rglob("*.png"))
                          - {root / r["path"] for r in records})
        if unlisted:
            raise ValueError(f"{root}: {len(unlisted)} images under {IMAGES_DIR}/ are not in its "
                             f"{MANIFEST}, e.g. {unlisted[0]} (a truncated or edited manifest); "
                             f"{prepare_hint(root)} (to leave emoji out, delete their images "
                             "too)")
        train, test = emoji_split({r["class"] for r in records})
        chosen = set(train if split == "train" else test)
        kept = [r for r in records if r["class"] in chosen]
        class_ids = [r["class"] for r in kept]
        self.styles = [r["style"] for r in kept]
        super().__init__([root / r["path"] for r in kept], reindex(class_ids), transform,
                         class_ids, source=f"the emoji {split} split of {root}")
