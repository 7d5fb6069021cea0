"""Cars196 (Krause et al. 2013) from the official ``cars_annos.mat``.

Split as in every DML paper: classes 1–98 train, 99–196 test (the file's own ``test`` flag is not
used). ``relative_im_path`` (e.g. ``car_ims/000001.jpg``) is relative to the root.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bgf_pyg.data.base import ImageListDataset, check_split, reindex, require

#: Last class id of the training split.
CARS_TRAIN_CLASSES = 98


def read_cars_annotations(file: Path) -> list[tuple[str, int]]:
    """``(relative_im_path, class)`` of every record of ``cars_annos.mat``."""
    from scipy.io import loadmat

    require(file)
    try:
        records = loadmat(file)["annotations"].reshape(-1)
        return [(str(r["relative_im_path"].item()), int(r["class"].item())) for r in records]
    except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
        raise ValueError(
            f"{file}: expected an 'annotations' struct array with fields relative_im_path and "
            f"class ({type(error).__name__}: {error})"
        ) from error


class Cars196(ImageListDataset):
    """Cars196 (Stanford Cars).

    Args:
        root: the folder holding ``cars_annos.mat`` and ``car_ims/``.
        split: ``"train"`` (classes 1–98, 8,054 images) or ``"test"`` (99–196, 8,131 images).
        transform: applied to each RGB ``PIL.Image``.
    """

    LAYOUT = "a folder holding cars_annos.mat and car_ims/"
    SPLIT = (f"classes 1–{CARS_TRAIN_CLASSES} train, {CARS_TRAIN_CLASSES + 1}–196 test "
             "(the 'class' field of cars_annos.mat; its 'test' flag is not used)")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        root = require(Path(root))
        train = check_split(split) == "train"
        records = read_cars_annotations(root / "cars_annos.mat")
        chosen = [(path, c) for path, c in records if (c <= CARS_TRAIN_CLASSES) == train]
        class_ids = [c for _, c in chosen]
        super().__init__([root / p for p, _ in chosen], reindex(class_ids), transform, class_ids,
                         source=f"the Cars196 {split} split of {root}")
