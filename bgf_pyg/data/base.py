"""The image-list dataset shared by every benchmark loader, and the parsing helpers they use.

Each benchmark module (``cub.py``, ``cars.py``, ``sop.py``, ``inshop.py``) only parses its official
annotation files into image paths and class ids; this module turns them into a ``Dataset`` with
labels re-indexed to ``0..C-1``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..checks import InputError

TRAIN_TEST = ("train", "test")


def check_split(split: str, splits: Sequence[str] = TRAIN_TEST) -> str:
    """Return ``split`` if it is one of ``splits``, else raise a ``ValueError`` listing them."""
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
    return split


def require(path: Path) -> Path:
    """Return ``path`` if it exists, else raise ``FileNotFoundError`` naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def read_rows(path: Path, num_fields: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows of a text annotation file, after ``skip`` header lines.

    Returns ``(line_number, fields)`` pairs (1-based line numbers, blank lines skipped); a row with
    fewer than ``num_fields`` fields raises a ``ValueError`` naming the file and line.
    """
    rows = []
    lines = require(path).read_text().splitlines()
    if len(lines) < skip:
        raise ValueError(f"{path}: expected {skip} header line(s), the file has {len(lines)}")
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < num_fields:
            raise ValueError(
                f"{path}, line {number}: expected {num_fields} fields, got {len(fields)}: {line!r}"
            )
        rows.append((number, fields))
    return rows


def parse_int(value: str, path: Path, number: int) -> int:
    """``int(value)``, or a ``ValueError`` naming the file and line."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}, line {number}: expected an integer, got {value!r}") from None


def reindex(class_ids: Sequence[Hashable]) -> list[int]:
    """Map class ids to ``0..C-1`` in sorted id order."""
    index = {c: i for i, c in enumerate(sorted(set(class_ids)))}
    return [index[c] for c in class_ids]


class LabelledDataset(Dataset):
    """Items ``(sample, label)`` with ``labels`` a (N,) ``LongTensor`` in ``0..C-1`` (what samplers
    need), ``class_ids`` the original class of each item and an optional ``transform``.
    Subclasses set those attributes and implement :meth:`load`."""

    labels: Tensor
    class_ids: list[Hashable]
    transform: Callable | None
    #: The folder layout and the standard class-id split, one line each (``bgf-train --help``).
    LAYOUT = ""
    SPLIT = ""

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(self.labels.unique().numel())

    def load(self, index: int) -> Any:
        """The untransformed sample ``index``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


class ImageListDataset(LabelledDataset):
    """Images read from ``paths`` with integer ``labels``.

    What is cheap is checked when the dataset is built: the list is not empty and every listed
    file exists (one ``stat`` per image); :func:`check_image_headers` reads the headers.

    Args:
        paths: image files. labels: one class index in ``0..C-1`` per image.
        transform: applied to the RGB ``PIL.Image``.
        class_ids: the dataset's original class id of each image (kept for reference).
        source: what the list is, for error messages (e.g. ``"CUB-200-2011 test split of
            /data/CUB_200_2011"``).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        transform: Callable | None = None,
        class_ids: Sequence[Hashable] | None = None,
        source: str = "the image list",
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        if not paths:
            split = f" (the standard split: {self.SPLIT})" if self.SPLIT else ""
            raise ValueError(f"{source} is empty{split}")
        self.source = source
        self.paths = [Path(p) for p in paths]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source}: {len(missing)} of the {len(self.paths)} listed images do not exist, "
                f"e.g. {missing[0]}"
            )
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.class_ids = list(labels if class_ids is None else class_ids)
        self.transform = transform

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read image {path}: {error}") from error


#: Levels of :func:`check_image_headers`: ``off``, ``header`` (PIL identifies the format and size:
#: reads the first bytes of each file) or ``decode`` (decodes every image: finds truncated files).
IMAGE_CHECKS = ("off", "header", "decode")


def check_image_headers(dataset: ImageListDataset, level: str = "header") -> None:
    """Open every image of ``dataset`` before training, so that a corrupt file is found now and
    not at the first evaluation; raise an ``InputError`` naming the bad files."""
    if level not in IMAGE_CHECKS:
        raise ValueError(f"level must be one of {IMAGE_CHECKS}, got {level!r}")
    if level == "off":
        return
    bad = []
    for path in dataset.paths:
        try:
            with Image.open(path) as image:
                if level == "decode":
                    image.load()
        except (OSError, ValueError, SyntaxError) as error:  # PIL's plugins raise all three
            bad.append(f"{path} ({error})")
    if bad:
        raise InputError(f"cannot read {len(bad)} of the {len(dataset.paths)} images of "
                         f"{dataset.source}, e.g. " + "; ".join(bad[:3]))
