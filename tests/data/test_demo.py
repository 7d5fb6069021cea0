"""The digits demo dataset and its drawings."""

import torch

from bgf_pyg.data import DigitsDemo, load_digits_demo
from bgf_pyg.data.demo import demo_drawings
from bgf_pyg.metrics import recall_at_k


def test_digits_demo():
    train, test = DigitsDemo("train"), DigitsDemo("test")
    assert not set(train.class_ids) & set(test.class_ids)
    assert set(train.class_ids) | set(test.class_ids) == set(range(100))
    assert len(train) == len(test) == 50 * 24
    image, label = test[0]
    assert image.shape == (1, 28, 56) and image.dtype == torch.float32
    assert 0 <= label < 50 and test.num_classes == 50
    images, numbers = load_digits_demo("test")
    again, _ = load_digits_demo("test")
    assert torch.equal(images, again) and not torch.equal(images, load_digits_demo("test", 1)[0])
    # The distortion keeps raw pixels far from solving it (chance is 23/1199 ≈ 0.02).
    assert 0.15 < recall_at_k(images.flatten(1), numbers, (1,))[1] < 0.4


def test_demo_drawings_belong_to_one_number():
    from sklearn.datasets import load_digits

    digit_of = torch.tensor(load_digits().target)
    owner: dict[int, int] = {}
    for split in ("train", "test"):
        numbers, drawings = demo_drawings(split)
        assert drawings.shape == (len(numbers), 2)
        # the left drawing shows the tens digit, the right one the units digit
        assert torch.equal(digit_of[drawings[:, 0]], numbers // 10)
        assert torch.equal(digit_of[drawings[:, 1]], numbers % 10)
        for number, pair in zip(numbers.tolist(), drawings.tolist(), strict=True):
            for drawing in pair:
                assert owner.setdefault(drawing, number) == number
    # several drawings per number and side, so images of a number differ in more than distortion
    assert len(owner) > 1500
