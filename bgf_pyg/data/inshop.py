"""In-Shop Clothes Retrieval (DeepFashion, Liu et al. 2016) in the official layout.

``Eval/list_eval_partition.txt``: a count line, a column-name line, then
``image_name item_id evaluation_status`` (status ``train``, ``query`` or ``gallery``); images lie
under ``Img/``. Query and gallery share one label re-indexing, so their labels can be compared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bgf_pyg.data.base import ImageListDataset, check_split, read_rows, reindex, require

INSHOP_SPLITS = ("train", "query", "gallery")


class InShop(ImageListDataset):
    """In-Shop Clothes Retrieval.

    Args:
        root: the In-Shop folder (holding ``Eval/list_eval_partition.txt`` and ``Img/``).
        split: ``"train"`` (3,997 items, 25,882 images), ``"query"`` (14,218 images) or
            ``"gallery"`` (12,612 images); query and gallery hold the same 3,985 items.
        transform: applied to each RGB ``PIL.Image``.

    ``class_ids`` holds the item ids (strings such as ``"id_00000001"``).
    """

    LAYOUT = "a folder holding Eval/list_eval_partition.txt and Img/"
    SPLIT = ("the evaluation_status column of Eval/list_eval_partition.txt: train (3,997 items), "
             "query and gallery (the other 3,985 items)")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        root = require(Path(root))
        check_split(split, INSHOP_SPLITS)
        file = root / "Eval" / "list_eval_partition.txt"
        rows = read_rows(file, 3, skip=2)
        for number, fields in rows:
            if fields[2] not in INSHOP_SPLITS:
                raise ValueError(
                    f"{file}, line {number}: evaluation_status must be one of {INSHOP_SPLITS}, "
                    f"got {fields[2]!r}"
                )
        # Train is indexed on its own; query and gallery on their union.
        indexed = {"train"} if split == "train" else {"query", "gallery"}
        items = [fields for _, fields in rows if fields[2] in indexed]
        labels = reindex([item_id for _, item_id, _ in items])
        chosen = [i for i, fields in enumerate(items) if fields[2] == split]
        super().__init__(
            [root / "Img" / items[i][0] for i in chosen],
            [labels[i] for i in chosen],
            transform,
            [items[i][1] for i in chosen],
            source=f"the In-Shop {split} split ({file})",
        )
