"""Custom Diffusion data: rescale augmentation, caption prefixes, masks, target/reg mixing."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from data.concept import BalancedConcat, ConceptDataset, concept_dataset
from data.transforms import (
    LARGE_PREFIXES,
    SMALL_PREFIXES,
    center_crop,
    plain,
    rescale,
    sample_scale,
    to_array,
)

SIZE = 64
PROMPT = "photo of a <tok-a> cat"  # test-only token


def gradient_image(w=80, h=60) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    y = np.linspace(0, 255, h, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((h, w), 128, np.uint8)), -1)
    return Image.fromarray(rgb)


def test_center_crop_is_the_middle_square():
    image = center_crop(gradient_image(80, 60))
    assert image.size == (60, 60)
    assert np.array_equal(np.asarray(image), np.asarray(gradient_image(80, 60))[:, 10:70])


def test_small_scale_pastes_on_grey_with_mask_and_prefix():
    image = center_crop(gradient_image())
    for seed in range(20):
        s = rescale(image, PROMPT, SIZE, 20, random.Random(seed))
        assert s.caption in {p + PROMPT for p in SMALL_PREFIXES}
        assert s.image.shape == (SIZE, SIZE, 3) and s.mask.shape == (SIZE, SIZE)
        rows, cols = np.nonzero(s.mask)
        top, left = rows.min(), cols.min()
        assert s.mask.sum() == 400 and rows.max() - top == 19 and cols.max() - left == 19
        assert np.all(s.image[s.mask == 0] == 0)  # mid-grey canvas
        pasted = to_array(image.resize((20, 20), Image.BICUBIC))
        assert np.array_equal(s.image[top : top + 20, left : left + 20], pasted)


def test_large_scale_crops_with_prefix_and_full_mask():
    image = center_crop(gradient_image())
    s = rescale(image, PROMPT, SIZE, 84, random.Random(0))
    assert s.caption in {p + PROMPT for p in LARGE_PREFIXES}
    assert s.image.shape == (SIZE, SIZE, 3) and s.mask.min() == 1
    big = to_array(image.resize((84, 84), Image.BICUBIC))
    windows = [big[t : t + SIZE, u : u + SIZE] for t in range(21) for u in range(21)]
    assert any(np.array_equal(s.image, w) for w in windows)


def test_middle_scale_is_a_plain_resize():
    image = center_crop(gradient_image())
    s = rescale(image, PROMPT, SIZE, 50, random.Random(0))
    ref = plain(image, PROMPT, SIZE)
    assert s.caption == PROMPT and np.array_equal(s.image, ref.image) and s.mask.min() == 1


def test_scale_distribution_matches_reference():
    rng = random.Random(0)
    scales = [sample_scale(SIZE, rng) for _ in range(3000)]
    assert all(s % 2 == 0 for s in scales)
    small = [s for s in scales if s <= SIZE]
    large = [s for s in scales if s > SIZE]
    assert min(small) >= SIZE // 3 and max(small) <= SIZE
    assert min(large) >= int(1.2 * SIZE) and max(large) <= int(1.4 * SIZE)
    assert abs(len(large) / len(scales) - 1 / 3) < 0.04


def write_folder(root, n, captions=None, colour=(200, 30, 30)):
    (root / "images").mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        paths.append(str(path))
    if captions is not None:
        (root / "images.txt").write_text("\n".join(paths) + "\n")
        (root / "caption.txt").write_text("\n".join(captions) + "\n")
    return root


@pytest.fixture()
def folders(tmp_path):
    targets = write_folder(tmp_path / "target", 2, ["ignored"] * 2)
    regs = write_folder(tmp_path / "reg", 3, ["a real cat", "two cats", "a cat on a mat"],
                        colour=(10, 10, 200))  # fmt: skip
    return targets, regs


def test_targets_and_regularization_mix_half_half(folders):
    targets, regs = folders
    ds = ConceptDataset(PROMPT, targets, None, regs, size=SIZE, seed=0)
    assert len(ds) == 6  # 2 x regularization images
    items = [ds[i] for i in range(len(ds))]
    assert [it["caption"] for it in items[:3]] == ["a real cat", "two cats", "a cat on a mat"]
    assert all(it["mask"].min() == 1 for it in items[:3])  # never augmented
    assert all(it["caption"].endswith(PROMPT) for it in items[3:])
    assert all(it["image"].shape == (SIZE, SIZE, 3) for it in items)
    prefixes = {ds[3 + i % 3]["caption"][: -len(PROMPT)] for i in range(200)}
    assert prefixes == {"", *SMALL_PREFIXES, *LARGE_PREFIXES}


def test_prior_loss_weight_marks_regularization_items(folders):
    targets, regs = folders
    ds = ConceptDataset(PROMPT, targets, None, regs, size=SIZE, seed=0)
    assert [ds[i]["loss_weight"] for i in range(6)] == [1.0] * 6  # the reference: weight 1
    ds = ConceptDataset(PROMPT, targets, None, regs, size=SIZE, prior_loss_weight=0.5, seed=0)
    assert [ds[i]["loss_weight"] for i in range(6)] == [0.5] * 3 + [1.0] * 3
    with pytest.raises(ValueError, match="prior_loss_weight"):
        ConceptDataset(PROMPT, targets, None, regs, size=SIZE, prior_loss_weight=-1)


def test_plain_folder_regularization_uses_class_prompt(folders, tmp_path):
    targets, _ = folders
    plain_regs = tmp_path / "plain"
    write_folder(plain_regs, 2)
    with pytest.raises(ValueError, match="class_prompt"):
        ConceptDataset(PROMPT, targets, None, plain_regs / "images", size=SIZE)
    ds = ConceptDataset(PROMPT, targets, "photo of a cat", plain_regs / "images", size=SIZE)
    assert ds[0]["caption"] == "photo of a cat" and ds[3]["caption"].endswith(PROMPT)


def test_several_regularization_folders_are_pooled(folders, tmp_path):
    targets, regs = folders
    plain_regs = write_folder(tmp_path / "plain", 2)
    ds = ConceptDataset(PROMPT, targets, "photo of a cat", [regs, plain_regs / "images"],
                        size=SIZE)  # fmt: skip
    assert len(ds) == 10  # 2 x (3 + 2) regularization images
    captions = [ds[i]["caption"] for i in range(5)]
    assert captions == ["a real cat", "two cats", "a cat on a mat"] + ["photo of a cat"] * 2


def test_no_regularization_repeat_and_no_aug(folders):
    targets, _ = folders
    assert len(ConceptDataset(PROMPT, targets, size=SIZE)) == 2
    ds = ConceptDataset(PROMPT, targets, size=SIZE, repeat=5, aug=False, flip_p=0.0)
    assert len(ds) == 10
    assert all(ds[i]["caption"] == PROMPT and ds[i]["mask"].min() == 1 for i in range(10))


def test_concepts_list_json_interleaves_concepts(folders, tmp_path):
    targets, regs = folders
    concepts = [
        {"instance_prompt": PROMPT, "instance_data_dir": str(targets),
         "class_prompt": "cat", "class_data_dir": str(regs)},
        {"instance_prompt": "photo of a <tok-b> dog", "instance_data_dir": str(targets)},
    ]  # fmt: skip
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    ds = concept_dataset(concepts_list=path, size=SIZE, repeat=2, aug=False)
    assert isinstance(ds, BalancedConcat) and len(ds) == 2 * 6
    captions = [ds[i]["caption"] for i in range(len(ds))]
    assert all("<tok-b>" in c for c in captions[1::2])
    assert not any("<tok-b>" in c for c in captions[0::2])
    assert isinstance(concept_dataset(concepts[:1], size=SIZE), ConceptDataset)
    with pytest.raises(ValueError, match="unknown concept keys"):
        concept_dataset([{**concepts[1], "instance_dir": "x"}], size=SIZE)
    with pytest.raises(ValueError, match="no concepts"):
        concept_dataset([], size=SIZE)
