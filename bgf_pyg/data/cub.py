"""CUB-200-2011 (Wah et al. 2011) in the official ``CUB_200_2011/`` layout.

Split as in every DML paper (and the intra-batch / ProxyGML code): classes 1–100 train, 101–200
test; the official ``train_test_split.txt`` is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bgf_pyg.data.base import (
    ImageListDataset,
    check_split,
    parse_int,
    read_rows,
    reindex,
    require,
)

#: Last class id of the training split.
CUB_TRAIN_CLASSES = 100


class CUB200(ImageListDataset):
    """CUB-200-2011.

    Args:
        root: the ``CUB_200_2011`` folder (holding ``images.txt``, ``image_class_labels.txt`` and
            ``images/``).
        split: ``"train"`` (classes 1–100, 5,864 images) or ``"test"`` (101–200, 5,924 images).
        transform: applied to each RGB ``PIL.Image``.
    """

    LAYOUT = "CUB_200_2011/ holding images.txt, image_class_labels.txt and images/"
    SPLIT = (f"classes 1–{CUB_TRAIN_CLASSES} train, {CUB_TRAIN_CLASSES + 1}–200 test "
             "(ids of image_class_labels.txt; train_test_split.txt is not used)")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        root = require(Path(root))
        train = check_split(split) == "train"
        images_file, labels_file = root / "images.txt", root / "image_class_labels.txt"
        relpaths = {f[0]: f[1] for _, f in read_rows(images_file, 2)}
        paths, class_ids = [], []
        for number, (image_id, class_id) in read_rows(labels_file, 2):
            class_id = parse_int(class_id, labels_file, number)
            if image_id not in relpaths:
                raise ValueError(
                    f"{labels_file}, line {number}: image id {image_id} is not in {images_file}"
                )
            if (class_id <= CUB_TRAIN_CLASSES) == train:
                paths.append(root / "images" / relpaths[image_id])
                class_ids.append(class_id)
        super().__init__(paths, reindex(class_ids), transform, class_ids,
                         source=f"the CUB-200-2011 {split} split of {root}")
