"""The validation split of held-out training classes (``bgf_pyg.data.splits``): disjoint, seeded,
independent of the order of the classes, on the digits demo and on an image dataset."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bgf_pyg.checks import InputError
from bgf_pyg.data import CUB200, DigitsDemo
from bgf_pyg.data.base import LabelledDataset
from bgf_pyg.data.splits import choose_val_classes, split_validation


class Classes(LabelledDataset):
    """Items that are just their class ids (for the split's properties)."""

    def __init__(self, class_ids):
        self.class_ids = list(class_ids)
        self.labels = torch.zeros(len(self.class_ids), dtype=torch.long)
        self.transform = None

    def load(self, index):
        return self.class_ids[index]


@settings(max_examples=40, deadline=None)
@given(classes=st.sets(st.integers(-50, 500), min_size=4, max_size=30),
       repeats=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_split_is_disjoint_seeded_and_independent_of_order(classes, repeats, seed, data):
    ids = sorted(classes) * repeats
    spec = data.draw(st.one_of(st.integers(2, len(classes) - 2),
                               st.floats(2 / len(classes), 1 - 2 / len(classes))))
    expected = round(spec * len(classes)) if isinstance(spec, float) else spec
    if not 2 <= expected <= len(classes) - 2:  # rounding left too few: the error case
        with pytest.raises(InputError, match="val_classes"):
            choose_val_classes(ids, spec, seed)
        return
    shuffled = data.draw(st.permutations(ids))
    train_part, val_part, held_out = split_validation(Classes(shuffled), spec, seed)
    assert held_out == choose_val_classes(ids, spec, seed)  # the order of the items is irrelevant
    assert len(held_out) == expected and set(held_out) <= classes
    assert set(val_part.class_ids) == set(held_out)
    assert set(train_part.class_ids) == classes - set(held_out)
    assert len(train_part) + len(val_part) == len(ids)
    assert [val_part[i][0] for i in range(len(val_part))] == val_part.class_ids
    for part in (train_part, val_part):  # labels re-indexed in sorted class-id order
        assert part.labels.tolist() == [sorted(set(part.class_ids)).index(c)
                                        for c in part.class_ids]


def test_split_depends_on_the_seed():
    splits = {tuple(choose_val_classes(range(100), 0.2, seed)) for seed in range(5)}
    assert len(splits) == 5


def test_demo_validation_numbers_come_from_the_training_numbers():
    train = DigitsDemo("train")
    train_part, val_part, held_out = split_validation(
        train, 10, seed=0, val_transform=lambda x: x + 100)
    test_numbers = set(DigitsDemo("test").class_ids)
    assert set(held_out) < set(train.class_ids) and not set(held_out) & test_numbers
    assert not set(train_part.class_ids) & (set(held_out) | test_numbers)
    image, label = val_part[0]
    assert image.min() > 50 and label == 0  # its own transform; labels 0..9
    assert train_part.num_classes == 40 and val_part.num_classes == 10


def test_image_dataset_split(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    classes = [1, 2, 3, 4, 5, 6, 101]
    (root / "images.txt").write_text("".join(f"{i} {i}.jpg\n" for i in range(1, 8)))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in enumerate(classes, start=1)))
    for i in range(1, 8):
        (root / "images" / f"{i}.jpg").touch()
    train_part, val_part, held_out = split_validation(CUB200(root, "train"), 0.5, seed=3)
    assert len(held_out) == 3 and set(held_out) < {1, 2, 3, 4, 5, 6}
    assert sorted(train_part.class_ids + val_part.class_ids) == [1, 2, 3, 4, 5, 6]
    assert [train_part.dataset.paths[i].name for i in val_part.indices] == \
        [f"{c}.jpg" for c in held_out]
