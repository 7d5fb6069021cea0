"""Fault injection on the frozen backbone's feature cache: whatever a cache file holds (cut at
any byte, another format's key, another image list's key, features of the wrong shape or not
finite), it is recomputed, never used; an image edited after caching is recomputed and one
deleted after the list was read is an error naming the file."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision import transforms as T

from bgf_pyg import run_folder
from bgf_pyg.checks import InputError
from bgf_pyg.data import CUB200, eval_transform
from bgf_pyg.data.features import CACHE_FORMAT, cache_path, cached_features, feature_key
from tests.data.test_datasets import make_cub
from tests.data.test_features import CountingTrunk, direct
from tests.models.test_efficientnet import SIZE
from tests.strategies import bounded


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A dataset, its trunk and transform, and the bytes of its valid cache file."""
    root = tmp_path_factory.mktemp("cub")
    dataset = CUB200(make_cub(root), "train")
    torch.manual_seed(0)
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    cached_features(dataset, trunk, transform, root / "cache")
    path = cache_path(root / "cache", feature_key(dataset, trunk, transform, "backbone"))
    return dataset, trunk, transform, path, path.read_bytes()


def recomputed(cached, contents: bytes) -> bool:
    """Whether the features are computed afresh (and correct) with ``contents`` in the cache
    file; the valid file is put back after."""
    dataset, trunk, transform, path, valid = cached
    path.write_bytes(contents)
    try:
        seen = trunk.images_seen
        features = cached_features(dataset, trunk, transform, path.parent)
        torch.testing.assert_close(features, direct(dataset, trunk, transform))
        return trunk.images_seen == seen + 2 * len(dataset)  # extraction + direct()
    finally:
        path.write_bytes(valid)


@bounded(15)
@given(st.data())
def test_a_file_cut_at_any_byte_is_recomputed(cached, data):
    valid = cached[4]
    assert recomputed(cached, valid[:data.draw(st.integers(0, len(valid) - 1))])


def stored(cached, **change) -> bytes:
    """A cache file of ``cached``'s inputs with ``change`` to its key or features."""
    dataset, trunk, transform, path, _ = cached
    state = {"key": feature_key(dataset, trunk, transform, "backbone"),
             "features": direct(dataset, trunk, transform)}
    state["key"].update(change.pop("key", {}))
    state.update(change)
    scratch = path.with_suffix(".scratch")
    run_folder.save_checkpoint(scratch, state)
    contents = scratch.read_bytes()
    scratch.unlink()
    return contents


@pytest.mark.parametrize("change", [
    {"key": {"format": CACHE_FORMAT - 1}},  # an older layout
    {"key": {"images": "0" * 64}},  # another image list of the same length
    {"key": {"count": 5}},
    {"features": torch.zeros(3, 5)},  # too few rows
    {"features": torch.zeros(4)},  # not (N, D)
    {"features": torch.zeros(4, 5, dtype=torch.long)},
    {"features": torch.full((4, 5), float("nan"))},
    {"features": None},
])
def test_a_file_of_other_inputs_or_invalid_features_is_recomputed(cached, change):
    assert recomputed(cached, stored(cached, **change))


def test_a_file_that_is_no_dict_is_recomputed(cached):
    dataset, trunk, transform, path, _ = cached
    scratch = path.with_suffix(".scratch")
    torch.save(torch.zeros(4, 5), scratch)
    contents = scratch.read_bytes()
    scratch.unlink()
    assert recomputed(cached, contents)


def test_an_image_edited_in_place_with_the_same_size_is_recomputed(tmp_path):
    """One byte of the compressed pixels changed: same size, a later modification time."""
    dataset = CUB200(make_cub(tmp_path), "train")
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    cached_features(dataset, trunk, transform, tmp_path / "cache")
    path = dataset.paths[2]
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # inside the entropy-coded scan, before the end marker
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert path.stat().st_size == stat.st_size
    seen = trunk.images_seen
    after = cached_features(dataset, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == seen + len(dataset)
    torch.testing.assert_close(after, direct(dataset, trunk, transform))


def test_an_image_deleted_after_the_list_was_read_is_named(tmp_path):
    dataset = CUB200(make_cub(tmp_path), "train")
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    cached_features(dataset, trunk, transform, tmp_path / "cache")
    dataset.paths[1].unlink()
    seen = trunk.images_seen
    with pytest.raises(InputError, match=f"cannot read image {dataset.paths[1]}: No such file"):
        cached_features(dataset, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == seen  # found before any extraction


class Undescribed:
    def __call__(self, image):
        return image


@pytest.mark.parametrize("part", [T.Lambda(lambda image: image), Undescribed()])
def test_a_transform_its_repr_does_not_describe_is_refused(tmp_path, part):
    """``Lambda()`` reads the same for every function (another one would reuse the features);
    a default repr holds an address (never reused)."""
    dataset = CUB200(make_cub(tmp_path), "train")
    trunk = CountingTrunk()
    transform = T.Compose([part, eval_transform(SIZE)])
    with pytest.raises(InputError, match="cannot key the feature cache"):
        cached_features(dataset, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == 0 and not (tmp_path / "cache").exists()
