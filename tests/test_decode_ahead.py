"""Decoding ahead into the cache: every image of a waited-for category is cached, identical to
what the in-process decode gives, and a bad image is left to the normal load to report."""
import numpy as np
import pytest

from datasets import MVTecCategory
from datasets.decode_ahead import DecodeAhead
from datasets.synthetic import make_category
from utils.errors import DataError


def splits(root, name, cache):
    return [MVTecCategory(root / name, split, 48, 40, cache_dir=cache)
            for split in ("train", "test")]


def test_a_waited_for_category_is_cached_with_the_images_an_in_process_decode_gives(tmp_path):
    for seed, name in enumerate(("part", "bolt")):
        make_category(tmp_path, name, n_train=5, n_test_good=2, defects={"dent": 2}, size=56,
                      seed=seed)
    cache = tmp_path / "cache"
    ahead = DecodeAhead({name: splits(tmp_path, name, cache) for name in ("part", "bolt")}, 2)
    try:
        ahead.wait("part")
        part = splits(tmp_path, "part", cache)
        assert all(split.fully_cached() for split in part)
    finally:
        ahead.close()
    uncached = splits(tmp_path, "part", None)
    for cached_split, decoded_split in zip(part, uncached):
        for index in range(len(cached_split)):
            for cached, decoded in zip(cached_split.load(index), decoded_split.load(index)):
                np.testing.assert_array_equal(cached, decoded)


def test_nothing_to_decode_starts_no_processes(tmp_path):
    make_category(tmp_path, "part", n_train=3, n_test_good=1, defects={"dent": 1}, size=48)
    cache = tmp_path / "cache"
    for split in splits(tmp_path, "part", cache):
        for index in range(len(split)):
            split.load(index)  # fills the cache
    ahead = DecodeAhead({"part": splits(tmp_path, "part", cache)}, 4)
    assert ahead.pool is None
    ahead.wait("part")  # nothing pending: returns at once
    ahead.close()


def test_a_bad_image_gets_no_entry_and_is_reported_by_the_normal_load(tmp_path):
    make_category(tmp_path, "part", n_train=4, n_test_good=1, defects={"dent": 1}, size=48)
    bad = tmp_path / "part" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    cache = tmp_path / "cache"
    ahead = DecodeAhead({"part": splits(tmp_path, "part", cache)}, 2)
    ahead.wait("part")
    ahead.close()
    train = splits(tmp_path, "part", cache)[0]
    fresh = [train.cache.is_fresh(train._cache_key(s), s.path, s.mask_path) for s in train.samples]
    assert fresh == [True, False, True, True]
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        train.load(1)
