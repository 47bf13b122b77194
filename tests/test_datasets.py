"""Reading MVTec-layout folders: labels, masks, nested types, image formats, geometry."""
import re
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets import MVTecCategory, ensure_category
from datasets.mvtec import (decode_image, preprocess, preprocess_image, preprocess_mask,
                            to_original_size, write_evaluation_maps)
from datasets.synthetic import make_category
from utils.errors import DataError


def test_labels_masks_and_nested_defect_types(synthetic_root):
    test = MVTecCategory(synthetic_root / "grid", "test", resize=72, crop=64)
    types = sorted({s.defect_type for s in test.samples})
    assert types == ["bent/left", "bent/right", "good", "scratch"]
    assert test.has_masks
    for i, sample in enumerate(test.samples):
        item = test[i]
        assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
        assert item["label"] == (sample.defect_type != "good")
        mask = item["mask"].numpy()
        assert set(np.unique(mask)) <= {0, 1}, "nearest-neighbour resizing keeps masks binary"
        assert (mask.sum() > 0) == (sample.defect_type != "good"), sample.path


def test_grayscale_becomes_three_equal_channels(synthetic_root):
    image = MVTecCategory(synthetic_root / "grid", "train")[0]["image"].numpy()
    assert image.shape[0] == 3
    assert np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2])


def test_missing_masks_disable_pixel_metrics(tmp_path):
    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 2}, masks=False)
    test = MVTecCategory(tmp_path / "part", "test")
    assert not test.has_masks and test.types_without_masks == ["dent"]
    assert test[len(test) - 1]["mask"].sum() == 0
    assert (test.unmasked_count, test.defective_count) == (2, 2)


def test_one_missing_mask_disables_pixel_metrics_and_is_counted(tmp_path):
    # pixel metrics over the masked images alone would be biased: all masks, or none used
    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 3, "cut": 2})
    (tmp_path / "part" / "ground_truth" / "dent" / "001_mask.png").unlink()
    test = MVTecCategory(tmp_path / "part", "test")
    assert not test.has_masks and test.types_without_masks == ["dent"]
    assert (test.unmasked_count, test.defective_count) == (1, 5)
    assert test.missing_mask == tmp_path / "part" / "ground_truth" / "dent" / "001_mask.png"


def test_masks_in_other_formats_are_found_and_jpeg_halos_are_not_defect(tmp_path):
    """Custom data keeps masks as JPEGs too: each is found under its image's name (not a nested
    defect type's mask of the same name), and the compression's grey halo is not marked -- nor
    lost, for a mark in red, which is a dark grey."""
    category = make_category(tmp_path, "part", n_train=2, n_test_good=1,
                             defects={"dent": 2, "dent/deep": 1}, size=64, seed=3)
    truth = {}
    for png in sorted((category / "ground_truth").rglob("*_mask.png")):
        marked = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE) > 0
        truth[png.relative_to(category).as_posix()] = marked
        drawn = np.zeros(marked.shape + (3,), np.uint8)
        drawn[marked] = (0, 0, 255) if "deep" in png.parts else (255, 255, 255)  # BGR red
        cv2.imwrite(str(png.with_suffix(".jpg")), drawn, [cv2.IMWRITE_JPEG_QUALITY, 75])
        png.unlink()
    halo = cv2.imread(str(category / "ground_truth/dent/000_mask.jpg"), cv2.IMREAD_GRAYSCALE)
    assert ((halo > 0) != truth["ground_truth/dent/000_mask.png"]).any()  # a halo to ignore
    test = MVTecCategory(category, "test", resize=64, crop=64)
    assert test.has_masks
    defective = [i for i in range(len(test)) if test.samples[i].label == 1]
    assert len(defective) == 3
    for i in defective:
        sample = test.samples[i]
        expected = truth[sample.mask_path.relative_to(category).with_suffix(".png").as_posix()]
        assert sample.mask_path.parent.name == sample.defect_type.split("/")[-1]
        wrong = int(((test[i]["mask"][0].numpy() == 1) != expected).sum())
        # the red mark's edge is smeared by JPEG's half-resolution colour: a pixel may differ
        # (read with > 0 its halo would add as many pixels as the mark has; >= 128 loses it all)
        assert wrong <= (2 if "deep" in sample.defect_type else 0), (sample.mask_path, wrong)


def test_test_images_are_labelled_by_their_folder_or_refused(tmp_path):
    """test/good/day1/ is normal, as train/good/day1/ is training data; an image directly in test/
    has no label, and used to become a defect type '.' that also turned pixel metrics off."""
    category = make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1})
    (category / "test" / "good").rename(category / "test" / "Good")  # made on Windows, say
    good = category / "test" / "Good"
    (good / "day1").mkdir()
    (good / "000.png").rename(good / "day1" / "000.png")
    test = MVTecCategory(category, "test", resize=64, crop=64)
    assert sorted((s.label, s.defect_type) for s in test.samples) == [(0, "good"), (1, "dent")]
    assert test.has_masks
    (good / "day1" / "000.png").rename(category / "test" / "loose.png")
    with pytest.raises(DataError, match=r"test image .*loose\.png is directly in test/; move it "
                                        r"into test/good/ if it is normal"):
        MVTecCategory(category, "test", resize=64, crop=64)


def test_a_mask_named_like_its_image_is_found(tmp_path):
    """Other datasets (and their annotation tools) name a mask like its image: 000.png."""
    category = make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 2})
    for mask in (category / "ground_truth" / "dent").iterdir():
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    test = MVTecCategory(category, "test", resize=64, crop=64)
    assert test.has_masks
    assert [s.mask_path.name for s in test.samples if s.label] == ["000.png", "001.png"]


@pytest.mark.parametrize("under,paint", [((255, 255, 255), (0, 0, 0)),
                                         ((255, 255, 255), (255, 0, 0)),
                                         ((0, 0, 0), (255, 255, 255))])
@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_a_mask_painted_on_a_transparent_layer_marks_what_is_painted(tmp_path, under, paint,
                                                                    suffix):
    """An image editor exports a layer's transparent pixels with whatever colour lay under them,
    often white: read as grey, such a mask marked its whole background, and a defect painted in
    black was read as the only normal part. An opaque mask is read by its grey values as before."""
    from PIL import Image as PILImage

    from datasets.mvtec import read_mask

    truth = np.zeros((32, 48), bool)
    truth[8:20, 10:30] = True
    layer = np.zeros((32, 48, 4), np.uint8)
    layer[..., :3], layer[truth, :3] = under, paint
    layer[truth, 3] = 255
    path = tmp_path / f"000_mask{suffix}"
    PILImage.fromarray(layer, "RGBA").save(path, **({"lossless": True} if suffix == ".webp" else {}))
    assert np.array_equal(read_mask(path) == 1, truth)
    layer[..., 3] = 255  # opaque: any non-zero grey marks it (a WebP's marks must be brighter)
    path = path.with_suffix(".png")
    PILImage.fromarray(layer, "RGBA").save(path)
    assert np.array_equal(read_mask(path) == 1, cv2.cvtColor(layer[..., :3], cv2.COLOR_RGB2GRAY) > 0)


def test_a_label_mask_in_a_lossy_format_is_refused_not_emptied(tmp_path):
    category = make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1})
    png = category / "ground_truth" / "dent" / "000_mask.png"
    cv2.imwrite(str(png.with_suffix(".jpg")), (cv2.imread(str(png), cv2.IMREAD_GRAYSCALE) > 0)
                .astype(np.uint8))  # labels 0/1
    png.unlink()
    test = MVTecCategory(category, "test", resize=64, crop=64)
    with pytest.raises(DataError, match=r"000_mask\.jpg .*below 16.*save the mask as PNG"):
        test[next(i for i, s in enumerate(test.samples) if s.label == 1)]


def test_mask_gets_the_same_geometry_as_its_image():
    """A marked rectangle in a 300x200 image lands on the same pixels in image and mask."""
    image = np.zeros((200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    image[90:110, 140:170] = 255
    mask[90:110, 140:170] = 1
    img = preprocess_image(image, resize=100, crop=96)
    msk = preprocess_mask(mask, resize=100, crop=96)
    assert img.shape == (96, 96, 3) and msk.shape == (96, 96)
    bright = img[:, :, 0] > 127
    assert (bright & (msk == 1)).sum() >= 0.8 * max(bright.sum(), msk.sum())


@pytest.mark.parametrize("height,width,resize,crop,tolerance", [
    (900, 900, 256, 224, 0.01), (700, 1024, 256, 224, 0.05), (90, 70, 64, 56, 0.1)])
def test_a_map_goes_back_onto_the_original_where_the_crop_took_it(height, width, resize, crop,
                                                                   tolerance):
    """A ramp preprocessed like an image and put back equals the ramp where the crop reached (half
    a crop pixel off would be 0.5-1.2 off), and the fill where it did not."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = 0.3 * x + 0.7 * y
    cropped = preprocess(Image.fromarray(ramp, mode="F"), resize, crop)[:, :, 0]
    back = to_original_size(cropped, height, width, resize, fill=-1.0)
    assert back.shape == (height, width) and back.dtype == np.float32
    rows, columns = np.nonzero(back != -1)
    seen = (rows.max() + 1 - rows.min()) * (columns.max() + 1 - columns.min())
    assert seen == (back != -1).sum()  # one rectangle, the crop's share of the image
    assert abs(seen / (height * width) - crop ** 2 / (resize ** 2 * max(height, width)
                                                       / min(height, width))) < 0.02
    inner = (slice(rows.min() + 4, rows.max() - 3), slice(columns.min() + 4, columns.max() - 3))
    assert np.abs(back[inner] - ramp[inner]).max() < tolerance


@pytest.mark.parametrize("kind", ["rgba", "gray16", "rgb16", "gray"])
def test_png_formats_decode_to_uint8_rgb(tmp_path, kind):
    rng = np.random.default_rng(0)
    pixels = {
        "rgba": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
        "gray16": rng.integers(0, 65536, (20, 30), dtype=np.uint16),
        "rgb16": rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16),
        "gray": rng.integers(0, 256, (20, 30), dtype=np.uint8),
    }[kind]
    path = tmp_path / f"{kind}.png"
    cv2.imwrite(str(path), pixels)
    image = np.asarray(decode_image(path).convert("RGB"))
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    if kind == "gray16":
        assert np.array_equal(image[:, :, 0], (pixels >> 8).astype(np.uint8))


def test_a_photo_is_turned_by_its_exif_orientation_like_its_mask(tmp_path):
    """A camera stores a portrait photo landscape with an EXIF tag to turn it; viewers, and an
    annotation tool drawing its mask, show it turned. Image and mask must be read alike: the
    image used to be read unturned, so the mask (turned by OpenCV's grayscale read) fitted
    neither its size nor its pixels."""
    from PIL import Image as PILImage

    category = make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1})
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :20] = 255  # a bright corner: top left as stored
    photo = PILImage.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    for old in (category / "test" / "dent").iterdir():
        old.unlink()
    photo.save(category / "test" / "dent" / "000.jpg", exif=exif, quality=95)
    shown = np.rot90(stored[:, :, 0], k=-1)  # 60 x 40, the corner now top right
    mask_file = category / "ground_truth" / "dent" / "000_mask.png"
    PILImage.fromarray((shown > 127).astype(np.uint8) * 255).save(mask_file)
    image = np.asarray(decode_image(category / "test" / "dent" / "000.jpg"))
    assert image.shape == (60, 40, 3)
    assert np.abs(image[..., 0].astype(int) - shown).mean() < 4
    test = MVTecCategory(category, "test", resize=40, crop=40)
    item = test[next(i for i, s in enumerate(test.samples) if s.label == 1)]
    bright = item["image"][0].numpy() > 127
    assert np.array_equal(bright, item["mask"][0].numpy() == 1)
    # --save-maps puts the map back at the size the photo is shown at
    write_evaluation_maps(tmp_path / "maps", test, np.zeros((len(test), 40, 40), np.float32))
    saved = cv2.imread(str(tmp_path / "maps" / "test" / "dent" / "000.tiff"), cv2.IMREAD_UNCHANGED)
    assert saved.shape == (60, 40)


def test_saved_maps_of_images_named_alike_are_kept_apart(tmp_path):
    """000.png beside 000.jpg (and 000.PNG) in one folder: each keeps a map of its own, none is
    written over another."""
    category = make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={})
    good = category / "test" / "good"
    image = cv2.imread(str(good / "000.png"))
    cv2.imwrite(str(good / "000.jpg"), image)
    cv2.imwrite(str(good / "000.PNG"), image)
    cv2.imwrite(str(good / "001.png"), image)
    test = MVTecCategory(category, "test", resize=40, crop=40)
    maps = np.stack([np.full((40, 40), i, np.float32) for i in range(len(test))])
    write_evaluation_maps(tmp_path / "maps", test, maps)
    written = {path.name: float(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).max())
               for path in (tmp_path / "maps" / "test" / "good").iterdir()}
    assert len(written) == len(test) == 4
    assert written["001.tiff"] == [s.path.name for s in test.samples].index("001.png")
    assert {"000_jpg.tiff", "000_png.tiff", "000_png_1.tiff"} < set(written)
    assert sorted(written.values()) == list(range(4))


@pytest.mark.parametrize("kind", ["rgb", "rgba", "gray", "gray16"])
@pytest.mark.parametrize("resample", ["bilinear", "lanczos"])
def test_the_crop_is_the_same_as_converting_the_full_image_first(tmp_path, kind, resample):
    """The decode skips the full-size colour conversion (PIL swaps BGR as it copies) and resizes
    grayscale as one channel; the crop must equal the plain route's: OpenCV's BGR(A) converted to
    RGB and grayscale repeated into three channels at full size, then resized."""
    rng = np.random.default_rng(1)
    shape = {"rgb": (90, 120, 3), "rgba": (90, 120, 4), "gray": (120, 90), "gray16": (120, 90)}[kind]
    pixels = rng.integers(0, 65536 if kind == "gray16" else 256, shape,
                          dtype=np.uint16 if kind == "gray16" else np.uint8)
    path = tmp_path / f"{kind}.png"
    cv2.imwrite(str(path), pixels)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if kind == "gray16":
        decoded = (decoded >> 8).astype(np.uint8)
    if decoded.ndim == 2:
        plain = np.repeat(decoded[:, :, None], 3, axis=2)
    else:
        plain = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB if kind == "rgba" else cv2.COLOR_BGR2RGB)
    assert decode_image(path).mode == ("L" if kind.startswith("gray") else "RGB")
    crop = preprocess(decode_image(path), 64, 56, resample)
    assert crop.shape == (56, 56, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, preprocess_image(plain, 64, 56, resample))
    assert np.array_equal(np.asarray(decode_image(path).convert("RGB")), plain)


def test_truncated_image_names_the_file(tmp_path):
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), np.zeros((10, 10, 3), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:20])
    with pytest.raises(DataError, match="broken.png"):
        decode_image(broken)


def _category_archive(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    make_category(source, "bottle", n_train=2, n_test_good=1, defects={"crack": 1}, size=32)
    archive = tmp_path / "bottle.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(source / "bottle", arcname="bottle")
    return archive


def _links(monkeypatch, *urls):
    from datasets import download
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle", list(urls))


def test_download_extracts_a_category_archive(tmp_path, monkeypatch):
    archive = _category_archive(tmp_path)
    root = tmp_path / "data"
    _links(monkeypatch, archive.as_uri())
    category = ensure_category(root, "bottle")
    assert (category / "train" / "good" / "000.png").is_file()
    assert not list(root.glob(".bottle*")), "temporary download or staging files left behind"


def test_corrupt_download_leaves_no_category_behind(tmp_path, monkeypatch):
    archive = _category_archive(tmp_path)
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt"):
        _links(monkeypatch, cut.as_uri())
        ensure_category(root, "bottle")
    assert not (root / "bottle").exists()
    assert not list(root.glob(".bottle*"))


def test_missing_category_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"bottle/train/good"):
        ensure_category(tmp_path, "bottle", download=False)
    with pytest.raises(DataError, match="could not download"):
        _links(monkeypatch, "http://127.0.0.1:9/bottle.tar.xz")
        ensure_category(tmp_path, "bottle")


def _cached_entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.img"))


def test_cache_returns_exactly_what_decoding_returns(tmp_path):
    make_category(tmp_path, "part", n_train=3, n_test_good=1, defects={"dent": 2}, size=80)
    cache = tmp_path / "cache"
    plain = MVTecCategory(tmp_path / "part", "test", resize=72, crop=64)
    cold = MVTecCategory(tmp_path / "part", "test", resize=72, crop=64, cache_dir=cache)
    assert not cold.fully_cached()
    first = [cold.load(i) for i in range(len(cold))]
    assert len(_cached_entries(cache)) == len(cold)  # one entry per image, mask inside it
    assert cold.fully_cached() and not plain.fully_cached()
    warm = MVTecCategory(tmp_path / "part", "test", resize=72, crop=64, cache_dir=cache)
    for i in range(len(warm)):
        image, mask = warm.load(i)
        expected_image, expected_mask = plain.load(i)
        assert np.array_equal(image, expected_image) and np.array_equal(mask, expected_mask)
        assert np.array_equal(image, first[i][0])


def test_truncated_or_earlier_format_cache_entry_is_decoded_again(tmp_path):
    """A cut entry (a full disk, a copy interrupted outside this program) is a miss, never a
    short image; an entry of the earlier .npy format is deleted, not left beside the new one."""
    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=80)
    cache = tmp_path / "cache"

    def cached_split():
        return MVTecCategory(tmp_path / "part", "test", resize=72, crop=64, cache_dir=cache)

    index = next(i for i, s in enumerate(cached_split().samples) if s.defect_type == "dent")
    expected = MVTecCategory(tmp_path / "part", "test", resize=72, crop=64).load(index)
    cached_split().load(index)
    [entry] = _cached_entries(cache)
    whole = entry.read_bytes()
    earlier = entry.with_suffix(".npy")
    earlier.write_bytes(b"an entry of the earlier format")
    entry.write_bytes(whole[:-10])  # the mask's last bytes missing
    image, mask = cached_split().load(index)
    assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1])
    assert mask.any(), "the defect's mask is the one stored"
    assert entry.read_bytes() == whole and not earlier.exists()
    # an entry of an earlier decode (before images were turned by their EXIF orientation, or
    # before transparent masks were read by their opacity) holds other pixels: made again
    pixels = len(whole) - expected[0].nbytes - expected[1].nbytes
    for earlier_tag in (b"adcache1", b"adcache2"):
        entry.write_bytes(earlier_tag + whole[8:pixels] + bytes(len(whole) - pixels))
        image, mask = cached_split().load(index)
        assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1])
        assert entry.read_bytes() == whole


def test_cache_is_invalidated_when_an_image_changes(tmp_path):
    make_category(tmp_path, "part", n_train=3, n_test_good=1, defects={"dent": 1}, size=80)
    cache = tmp_path / "cache"
    train = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64, cache_dir=cache)
    before = [train.load(i) for i in range(len(train))][0][0]
    assert train.fully_cached()
    path = train.samples[0].path
    # Same size on disk is possible for an edit, so change the pixels and keep the stat honest.
    cv2.imwrite(str(path), np.full((80, 80, 3), 17, np.uint8))
    stat = path.stat()
    import os
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64, cache_dir=cache)
    # fully_cached decides whether loader processes start: the stale entry must count as missing
    assert not edited.fully_cached()
    after = edited.load(0)[0]
    assert not np.array_equal(before, after)
    assert np.all(after == 17), "the edited file is decoded again, not served from the cache"
    assert len(_cached_entries(cache)) == len(train), "a stale entry is replaced, not kept beside"


def test_cache_keeps_resize_settings_apart(tmp_path):
    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=80)
    cache = tmp_path / "cache"
    small = MVTecCategory(tmp_path / "part", "train", resize=40, crop=32, cache_dir=cache).load(0)
    large = MVTecCategory(tmp_path / "part", "train", resize=80, crop=64, cache_dir=cache).load(0)
    assert small[0].shape == (32, 32, 3) and large[0].shape == (64, 64, 3)
    lanczos = MVTecCategory(tmp_path / "part", "train", resize=80, crop=64, cache_dir=cache,
                            resample="lanczos").load(0)
    expected = preprocess(decode_image(
        MVTecCategory(tmp_path / "part", "train").samples[0].path), 80, 64, "lanczos")
    assert np.array_equal(lanczos[0], expected)
    assert {p.parent.parent.name for p in _cached_entries(cache)} == {
        "bilinear_40_32", "bilinear_80_64", "lanczos_80_64"}


def test_unwritable_cache_falls_back_to_decoding(tmp_path, caplog, monkeypatch):
    """Found when the split is built, so loader processes inherit it: one warning per cache
    folder, not one per process, nor one per category (each has a sub-folder of its own, and
    all 15 used to repeat the same line); under torchrun rank 0 says it."""
    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=64)
    make_category(tmp_path, "gear", n_train=2, n_test_good=1, defects={"dent": 1}, size=64)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    with caplog.at_level("WARNING", logger="datasets.cache"):
        monkeypatch.setenv("RANK", "1")
        MVTecCategory(tmp_path / "gear", "train", resize=64, crop=64, cache_dir=blocker)
        monkeypatch.setenv("RANK", "0")
        splits = [MVTecCategory(tmp_path / category, split, resize=64, crop=64,
                                cache_dir=blocker)
                  for category in ("part", "gear") for split in ("train", "test")]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["image cache disabled"]
    assert f"cannot write {blocker / 'bilinear_64_64' / 'part'} (" in caplog.records[0].getMessage()
    assert not any(split.cache.enabled for split in splits)
    image, _ = splits[0].load(0)
    assert image.shape == (64, 64, 3)


def test_a_read_only_data_root_is_cached_in_the_users_cache(tmp_path, monkeypatch, caplog):
    """A lab's read-only copy of MVTec AD used to mean no cache: every image decoded every run."""
    import os

    from config import default_cache_dir, resolve_config

    roots = [tmp_path / "share" / "mvtec", tmp_path / "other" / "mvtec"]
    for root in roots:
        root.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in roots
                        and real_access(path, mode))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    default_cache_dir.cache_clear()
    with caplog.at_level("INFO", logger="datasets.cache"):
        folders = [resolve_config(data_root=root, result_dir=tmp_path / "r").cache_dir
                   for root in roots + roots]
    assert folders[:2] == folders[2:] and folders[0] != folders[1]  # one folder per data root
    assert all(folder.parent == tmp_path / "user" / "anomaly-detection-images"
               and folder.name.startswith("mvtec-") for folder in folders)
    assert len(caplog.records) == 2 and str(folders[0]) in caplog.records[0].getMessage()
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes find the same: rank 0 says it
    default_cache_dir.cache_clear()
    with caplog.at_level("INFO", logger="datasets.cache"):
        assert resolve_config(data_root=roots[0], result_dir=tmp_path / "r").cache_dir == \
            folders[0]
    assert len(caplog.records) == 2
    monkeypatch.delenv("RANK")
    (roots[0] / ".cache").mkdir()  # a cache filled before the share was made read-only is read
    default_cache_dir.cache_clear()
    assert resolve_config(data_root=roots[0], result_dir=tmp_path / "r").cache_dir == \
        roots[0] / ".cache"
    monkeypatch.setattr(os, "access", real_access)
    default_cache_dir.cache_clear()
    assert resolve_config(data_root=roots[1], result_dir=tmp_path / "r").cache_dir == \
        roots[1] / ".cache"


def test_truncated_training_image_stops_with_its_name_or_is_skipped(tmp_path, capfd,
                                                                    resnet18_weights):
    import main
    make_category(tmp_path / "data", "part", n_train=4, n_test_good=1, defects={"dent": 1},
                  size=48)
    broken = tmp_path / "data" / "part" / "train" / "good" / "001.png"
    broken.write_bytes(broken.read_bytes()[:200])  # past the header: OpenCV notes it
    flags = ["--backbone", "resnet18", "--weights", str(resnet18_weights), "--data-root",
             str(tmp_path / "data"), "--custom", "--resize", "48", "--crop", "48", "--coreset",
             "0.5", "--plots", "0", "--no-progress", "--workers", "0", "--no-cache"]
    assert main.main(flags + ["--result-dir", str(tmp_path / "a")]) == 2
    assert capfd.readouterr().err.strip() == (
        f"error: cannot read image {broken}: the file is missing, empty, truncated or not an "
        "image; replace or delete it (or pass --skip-bad-images)")
    assert main.main(flags + ["--skip-bad-images", "--result-dir", str(tmp_path / "b")]) == 0
    # one line, without the advice to skip it (it is skipped) and without OpenCV's own note
    assert capfd.readouterr().err.splitlines() == [
        f"warning: skipping {broken}: the file is missing, empty, truncated or not an image"]
    import json
    part = json.loads((tmp_path / "b" / "metrics.json").read_text())["categories"]["part"]
    assert part["n_train"] == 3


def test_mask_of_another_size_is_refused_with_both_sizes(tmp_path):
    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=48)
    mask = tmp_path / "part" / "ground_truth" / "dent" / "000_mask.png"
    cv2.imwrite(str(mask), np.zeros((30, 40), np.uint8))
    test = MVTecCategory(tmp_path / "part", "test")
    index = next(i for i, s in enumerate(test.samples) if s.defect_type == "dent")
    image = tmp_path / "part" / "test" / "dent" / "000.png"
    with pytest.raises(DataError) as error:
        test.load(index)
    assert str(error.value) == (f"mask {mask} is 40x30 but its image {image} is 48x48; masks "
                                "must have their image's size")


def test_cached_split_is_read_ahead_by_a_thread_with_the_same_batches(tmp_path):
    """A fully cached split skips loader processes (datasets.loader): the thread must yield the
    loader's batches in order, let the consumer stop early, and raise a bad file's DataError."""
    import threading

    import torch

    from datasets.loader import ImageBatches
    from datasets.prefetch import ThreadPrefetcher

    make_category(tmp_path, "part", n_train=11, n_test_good=1, defects={"dent": 1}, size=64)
    cache = tmp_path / "cache"
    train = MVTecCategory(tmp_path / "part", "train", resize=64, crop=64, cache_dir=cache)
    assert isinstance(ImageBatches(train, 4).loader,
                      torch.utils.data.DataLoader)  # not cached yet: decoded by processes
    expected = list(torch.utils.data.DataLoader(train, batch_size=4))
    loader = ImageBatches(train, 4).loader
    assert isinstance(loader, ThreadPrefetcher) and loader.dataset.dataset is train
    got = [batch for batch, failed in loader if not failed]
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):  # the thread's NumPy stacking is default_collate's batch
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for _ in loader:
        break  # stopping early must not leave the reading thread blocked
    assert not any(t.name == "prefetch" for t in threading.enumerate())
    train.samples[5].path.write_bytes(b"not a png")  # newer mtime: the entry is stale
    with pytest.raises(DataError, match=train.samples[5].path.name):
        list(ThreadPrefetcher(torch.utils.data.DataLoader(train, batch_size=4)))


@pytest.mark.parametrize("resample", ["bilinear", "lanczos"])
def test_a_crop_copy_reads_back_as_the_originals_crops(tmp_path, synthetic_root, resample):
    from datasets.crop_copy import write_crop_copy
    for category in ("cubes", "grid"):  # RGB, and grayscale with nested defect types
        copy = write_crop_copy(synthetic_root / category, tmp_path, resize=48, crop=40,
                               resample=resample)
        for split in ("train", "test"):
            original = MVTecCategory(synthetic_root / category, split, resize=48, crop=40,
                                     resample=resample)
            copied = MVTecCategory(copy, split, resize=40, crop=40, resample=resample)
            assert [s.path.relative_to(copy) for s in copied.samples] == \
                [s.path.relative_to(synthetic_root / category) for s in original.samples]
            assert copied.has_masks == original.has_masks
            for index in range(len(original)):
                (image, mask), (image_copy, mask_copy) = original.load(index), copied.load(index)
                assert np.array_equal(image, image_copy) and np.array_equal(mask, mask_copy)


def test_hidden_files_and_folders_are_not_data(tmp_path):
    """macOS's AppleDouble ``._name.png`` (not a PNG) beside each copied image and Jupyter's
    ``.ipynb_checkpoints/`` copies are skipped by the reader, --predict's folders and the data
    fingerprint alike."""
    import shutil

    from datasets.mvtec import collect_images, list_samples
    from utils.environment import data_fingerprint

    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 2}, size=32)
    category = tmp_path / "part"
    before = {split: list_samples(category, split) for split in ("train", "test")}
    fingerprint = data_fingerprint(category)
    for image in list(category.rglob("*.png")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    checkpoints = category / "test" / "good" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    shutil.copy(category / "test" / "dent" / "000.png", checkpoints / "000.png")
    assert {split: list_samples(category, split) for split in ("train", "test")} == before
    assert collect_images([category / "test"]) == [s.path for s in before["test"]]
    assert data_fingerprint(category) == fingerprint
    MVTecCategory(category, "train", resize=32, crop=32).load(0)  # nothing unreadable is listed


def test_folders_linked_in_from_elsewhere_are_data_and_a_link_loop_ends(tmp_path):
    """train/good/day2 -> other storage: pathlib's rglob did not follow it, so its images were
    left out of the memory without a word."""
    from datasets.mvtec import list_samples

    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 2}, size=32)
    make_category(tmp_path / "nas", "day2", n_train=2, n_test_good=0, defects={}, size=32)
    good = tmp_path / "part" / "train" / "good"
    (good / "day2").symlink_to(tmp_path / "nas" / "day2" / "train" / "good")
    (tmp_path / "nas" / "day2" / "train" / "good" / "up").symlink_to(good)  # a loop
    train = list_samples(tmp_path / "part", "train")
    assert [s.path.relative_to(good).as_posix() for s in train] == [
        "000.png", "001.png", "002.png", "day2/000.png", "day2/001.png"]


@pytest.mark.parametrize("link", ["train/good/day2", "train/good/007.png", "test/dent/9.png",
                                  "ground_truth/dent/day2"])
def test_a_link_to_nothing_among_the_data_is_named(tmp_path, link):
    """A folder linked in from a drive that is not mounted was left out without a word (os.walk
    lists a dangling link as a file, and it is no file): its images silently missing from the
    memory or the test set."""
    from datasets.mvtec import collect_images, list_samples

    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 2}, size=32)
    (tmp_path / "part" / link).symlink_to(tmp_path / "nas" / "day2")
    message = "^" + re.escape(f"{tmp_path / 'part' / link} links to {tmp_path / 'nas' / 'day2'}, "
                              "which does not exist (a drive not mounted?); mount it, or delete "
                              "the link") + "$"
    with pytest.raises(DataError, match=message):
        for split in ("train", "test"):
            list_samples(tmp_path / "part", split)
    with pytest.raises(DataError, match=message):
        collect_images([tmp_path / "part"])


def test_a_data_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """os.walk goes on without a folder it cannot list (no read permission: another user's
    copy), which left its images out without a word. Simulated: the tests may run as root."""
    import os

    from datasets.mvtec import list_samples
    from utils.environment import data_fingerprint

    make_category(tmp_path, "part", n_train=3, n_test_good=2, defects={"dent": 2}, size=32)
    locked = tmp_path / "part" / "train" / "good" / "day2"
    locked.mkdir()
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match="^" + re.escape(
            f"cannot list {locked} (Permission denied); give yourself read access to it, or "
            "move it out of the data") + "$"):
        list_samples(tmp_path / "part", "train")
    assert len(list_samples(tmp_path / "part", "test")) == 4
    (tmp_path / "part" / "ground_truth").rename(tmp_path / "masks")  # a missing folder: nothing
    locked.rmdir()
    assert data_fingerprint(tmp_path / "part")["files"] == 3 + 2 + 2


def test_a_folder_with_train_but_no_train_good_is_named(tmp_path, caplog, monkeypatch):
    """train/Good/ (or the images straight in train/) was passed over without a word when another
    category was there, and otherwise "no category folders" left the user to find why."""
    from datasets.mvtec import find_categories

    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=16)
    (tmp_path / "part" / "train" / "good").rename(tmp_path / "part" / "train" / "Good")
    hint = "part has train/ but no train/good: put the normal images in train/good (lower case)"
    with pytest.raises(DataError, match=re.escape(f"under data_root {tmp_path}; {hint}")):
        find_categories(tmp_path)
    make_category(tmp_path, "gear", n_train=2, n_test_good=1, defects={"dent": 1}, size=16)
    with caplog.at_level("WARNING", logger="datasets.mvtec"):
        monkeypatch.setenv("RANK", "1")  # every torchrun process lists the folders: one says so
        assert find_categories(tmp_path) == ["gear"]
        monkeypatch.setenv("RANK", "0")
        assert find_categories(tmp_path) == find_categories(tmp_path) == ["gear"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: not read as categories: {hint}"]


def test_crop_copy_command_reports_a_missing_category_in_one_line(tmp_path, capsys):
    from datasets.crop_copy import main as crop_copy
    assert crop_copy(["--data-root", str(tmp_path), "--category", "nosuch",
                      "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no training images in {tmp_path / 'nosuch' / 'train' / 'good'}: put the normal "
        "(defect-free) images there as PNG/JPEG")


def test_crop_copy_refuses_to_write_over_or_into_the_category_it_copies(tmp_path, capsys):
    """--out set to the data root wrote every 224 crop over its 900 px original."""
    from datasets.crop_copy import main as crop_copy
    make_category(tmp_path, "part", n_train=2, n_test_good=1, defects={"dent": 1}, size=48)
    before = {p: p.read_bytes() for p in (tmp_path / "part").rglob("*.png")}
    for out in (tmp_path, tmp_path / "part" / "test"):
        assert crop_copy(["--data-root", str(tmp_path), "--category", "part", "--out", str(out),
                          "--resize", "40", "--crop", "32"]) == 2
        assert capsys.readouterr().err == (
            f"error: --out {out} puts the copy at {out / 'part'}, which overlaps the category "
            f"{tmp_path / 'part'} itself; give a folder outside it\n")
    assert {p: p.read_bytes() for p in (tmp_path / "part").rglob("*.png")} == before


@pytest.mark.parametrize("crop", [1, 3])
def test_items_of_any_crop_are_arrays_torch_may_share(tmp_path, crop):
    """A 1 x 1 crop's channels-first view is contiguous without a copy, so it stayed the PIL
    image's read-only view: torch warned of undefined behaviour on every --predict with it."""
    import warnings

    from datasets.mvtec import ImageFiles

    path = tmp_path / "one.png"
    cv2.imwrite(str(path), np.full((8, 8, 3), 200, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = ImageFiles([path], resize=crop, crop=crop, resample="bilinear")[0]
        uncached = MVTecCategory(make_category(tmp_path / "data", "cubes", n_train=1,
                                               n_test_good=1, defects={"blob": 1}),
                                 "test", resize=crop, crop=crop, cache_dir=None)[0]
    assert item["image"].shape == (3, crop, crop) and int(item["image"][0, 0, 0]) == 200
    assert uncached["image"].shape == (3, crop, crop)
