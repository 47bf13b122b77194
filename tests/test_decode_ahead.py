"""Decoding ahead into the cache: every image of a waited-for category is cached, identical to
what the in-process decode gives, and a bad image is left to the normal load to report."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from datasets import MVTecCategory
from datasets.decode_ahead import DecodeAhead
from datasets.synthetic import make_category
from tests.conftest import REPO
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
        given = ahead.splits["part"]
        assert ahead.wait("part") is given  # the same datasets, known to be cached: no check
        for split in given:
            split.cache.is_fresh = None  # (a check would call it)
            assert split.fully_cached()
        part = splits(tmp_path, "part", cache)
        assert all(split.fully_cached() for split in part)  # checked from the files
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
    assert len(ahead.wait("part")) == 2  # nothing pending: at once, the datasets it was given
    assert ahead.wait("bolt") is None  # not given
    ahead.close()


def test_a_bad_image_gets_no_entry_and_is_reported_by_the_normal_load(tmp_path):
    make_category(tmp_path, "part", n_train=4, n_test_good=1, defects={"dent": 1}, size=48)
    bad = tmp_path / "part" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    cache = tmp_path / "cache"
    ahead = DecodeAhead({"part": splits(tmp_path, "part", cache)}, 2)
    assert ahead.wait("part") is None  # the run lists and loads it itself, and reports the image
    ahead.close()
    train = splits(tmp_path, "part", cache)[0]
    fresh = [train.cache.is_fresh(train._cache_key(s), s.path, s.mask_path) for s in train.samples]
    assert fresh == [True, False, True, True]
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        train.load(1)


def test_decoding_ahead_starts_after_opencv_ran_threads_in_this_process(tmp_path):
    """OpenCV's thread pool, once it has run, is copied into a forked child without its threads;
    resizing it there hung the pool's processes (a sweep's second run met this after its first)."""
    make_category(tmp_path, "part", n_train=3, n_test_good=1, defects={"dent": 1}, size=48)
    script = textwrap.dedent(f"""
        import cv2, numpy as np
        from datasets import MVTecCategory
        from datasets.decode_ahead import DecodeAhead
        threads = cv2.getNumThreads()
        big = np.zeros((2000, 2000, 3), np.uint8)
        cv2.resize(big, (700, 700), interpolation=cv2.INTER_AREA)  # runs the thread pool
        part = [MVTecCategory({str(tmp_path / "part")!r}, split, 48, 40,
                              cache_dir={str(tmp_path / "cache")!r}) for split in ("train", "test")]
        ahead = DecodeAhead({{"part": part}}, 2)
        ahead.wait("part")
        ahead.close()
        print(all(split.fully_cached() for split in part), cv2.getNumThreads() == threads)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the pool's processes with it
        pytest.fail("decoding ahead hung after OpenCV had run threads")
    assert process.returncode == 0, err
    assert out.split() == ["True", "True"]  # every image cached; this process's threads restored
