"""Stanford Online Products (Oh Song et al. 2016) in the official layout.

The official ``Ebay_train.txt`` (classes 1–11,318) and ``Ebay_test.txt`` (11,319–22,634) define
the split: a header line, then ``image_id class_id super_class_id path`` (paths relative to the
root).
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


class StanfordOnlineProducts(ImageListDataset):
    """Stanford Online Products.

    Args:
        root: the ``Stanford_Online_Products`` folder (holding ``Ebay_train.txt``,
            ``Ebay_test.txt`` and the per-category image folders).
        split: ``"train"`` (59,551 images) or ``"test"`` (60,502 images).
        transform: applied to each RGB ``PIL.Image``.
    """

    LAYOUT = "Stanford_Online_Products/ holding Ebay_train.txt, Ebay_test.txt and the image folders"
    SPLIT = "the images listed in Ebay_train.txt (classes 1–11,318) / Ebay_test.txt (11,319–22,634)"

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        root = require(Path(root))
        file = root / f"Ebay_{check_split(split)}.txt"
        rows = read_rows(file, 4, skip=1)
        paths = [root / fields[3] for _, fields in rows]
        class_ids = [parse_int(fields[1], file, number) for number, fields in rows]
        super().__init__(paths, reindex(class_ids), transform, class_ids,
                         source=f"the SOP {split} split ({file})")
