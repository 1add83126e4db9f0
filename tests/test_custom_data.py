"""Bad input on the concept-data path: each case is skipped with one logged line or refused
with a one-line message; odd but valid images are read correctly."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from data.concept import ConceptDataset
from data.datasets import CaptionedImages, image_problem, open_rgb

PROMPT = "photo of a <tok-a> cat"  # test-only token
SIZE = 64


def rgb(w=40, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def write_bad_folder(root):
    """One good image and one of each bad or odd case; returns the names expected kept."""
    root.mkdir()
    rgb().save(root / "good.png")
    (root / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(500))
    buf = io.BytesIO()
    rgb(64, 64).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rgb().convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(root / "grey16.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:20] = (255, 0, 0, 255)  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rgb(40, 20).save(root / "rotated.jpg", exif=exif.tobytes())
    rgb(4, 4).save(root / "tiny.png")
    rgb(64, 64).save(root / "huge.png")  # over the (patched) decompression-bomb limit
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (root / "text.jpg").write_text("a caption, not a JPEG")
    return ["cmyk.jpg", "good.png", "grey16.png", "rgba.png", "rotated.jpg"]


@pytest.fixture()
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 warns, 64x64 is an error


def test_bad_files_are_skipped_with_one_line_each(tmp_path, caplog, small_bomb_limit):
    kept = write_bad_folder(tmp_path / "imgs")
    with caplog.at_level(logging.INFO):
        ds = CaptionedImages(tmp_path / "imgs", size=SIZE, caption=PROMPT)
    assert sorted(p.name for p, _ in ds.items) == kept
    skips = {r.getMessage().split(": ", 1)[0].rsplit("/", 1)[-1]: r.getMessage()
             for r in caplog.records if r.getMessage().startswith("skipping")}  # fmt: skip
    assert set(skips) == {"corrupt.png", "truncated.jpg", "tiny.png", "huge.png", "text.jpg"}
    assert "not an image" in skips["corrupt.png"] and "not an image" in skips["text.jpg"]
    assert "truncated" in skips["truncated.jpg"] and "too small (4x4" in skips["tiny.png"]
    assert "too large" in skips["huge.png"]
    assert any("ignoring 1 files that are not images (notes.pdf)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert all("\n" not in r.getMessage() for r in caplog.records)
    for i in range(len(ds)):
        assert ds[i]["image"].shape == (SIZE, SIZE, 3)


def test_odd_images_are_read_correctly(tmp_path, small_bomb_limit):
    write_bad_folder(tmp_path / "imgs")
    grey = np.asarray(open_rgb(tmp_path / "imgs" / "grey16.png"))
    assert grey.shape == (40, 40, 3) and abs(int(grey.mean()) - 128) <= 1  # scaled, not clipped
    rgba = np.asarray(open_rgb(tmp_path / "imgs" / "rgba.png"))
    assert (rgba[:20] == (255, 0, 0)).all() and (rgba[20:] == 255).all()  # onto white
    assert open_rgb(tmp_path / "imgs" / "rotated.jpg").size == (20, 40)  # EXIF applied
    cmyk = np.asarray(open_rgb(tmp_path / "imgs" / "cmyk.jpg"), dtype=float)
    assert np.abs(cmyk - np.asarray(rgb(), dtype=float)).mean() < 10
    assert image_problem(tmp_path / "imgs" / "good.png") is None


def test_concept_dataset_with_bad_files_trains_on_the_good_ones(tmp_path, small_bomb_limit):
    kept = write_bad_folder(tmp_path / "imgs")
    ds = ConceptDataset(PROMPT, tmp_path / "imgs", size=SIZE, seed=0)
    assert len(ds) == len(kept)
    assert all(ds[i]["image"].shape == (SIZE, SIZE, 3) for i in range(len(ds)))


def test_empty_missing_and_all_bad_folders_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    for folder, error, text in [
        (tmp_path / "empty", ValueError, "no readable images in"),
        (tmp_path / "bad", ValueError, "no readable images in"),
        (tmp_path / "missing", FileNotFoundError, "image folder not found"),
    ]:
        with pytest.raises(error, match=text) as info:
            ConceptDataset(PROMPT, folder, size=SIZE)
        assert "\n" not in str(info.value)


def test_reference_layout_listing_missing_files(tmp_path, caplog):
    root = tmp_path / "reg"
    root.mkdir()
    rgb().save(root / "a.png")
    (root / "images.txt").write_text(f"{root / 'a.png'}\n{root / 'gone.png'}\n")
    (root / "caption.txt").write_text("a cat\na dog\n")
    ds = CaptionedImages(root, size=SIZE)
    assert [c for _, c in ds.items] == ["a cat"] and "gone.png" in caplog.text


def test_small_targets_warn_about_upscaling(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    rgb(20, 20).save(tmp_path / "imgs" / "small.png")
    ConceptDataset(PROMPT, tmp_path / "imgs", size=256)
    assert "20 px upscaled 13x to 256 px" in caplog.text


def test_existing_token_is_refused_in_one_line():
    from tests.test_custom import custom_model

    with pytest.raises(ValueError, match="already exists in the vocabulary") as info:
        custom_model(modifier_tokens=["cat"])
    assert "\n" not in str(info.value)
