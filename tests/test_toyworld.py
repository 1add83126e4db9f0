"""Tests of the toy world: determinism, captions, concept exclusion, judge accuracy, export."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from toyworld import COLOURS, CONCEPTS, PATTERNS, SHAPES, ObjectSpec, render_scene
from toyworld.captions import caption, parse_caption
from toyworld.concepts import EXCLUDED_COMBOS, export_concept, main, near_misses
from toyworld.dataset import ToyWorldDataset, make_example, render_spec
from toyworld.judge import Judge, evaluate_judge, to_batch
from toyworld.names import load_names, object_names
from toyworld.sampler import sample_scene
from toyworld.world import COLOUR_RGB


@pytest.fixture(scope="module")
def judge() -> Judge:
    torch.set_num_threads(1)
    return Judge.load()


@pytest.fixture(scope="module")
def sampled_scenes() -> list:
    rng = np.random.default_rng(2024)
    return [sample_scene(rng, pattern_prob=0.5) for _ in range(5000)]


def test_vocabulary() -> None:
    assert len(SHAPES) >= 6 and len(COLOURS) >= 6
    assert PATTERNS[0] == "plain"
    assert 5 <= len(CONCEPTS) <= 6


def test_dataset_item_is_deterministic() -> None:
    a = ToyWorldDataset(length=20, seed=3)
    b = ToyWorldDataset(length=20, seed=3)
    x, y = a[7], b[7]
    assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert torch.equal(a[7]["image"], x["image"])  # same object, second read
    assert not torch.equal(a[8]["image"], x["image"])
    assert not torch.equal(ToyWorldDataset(length=20, seed=4)[7]["image"], x["image"])
    img = x["image"]
    assert img.shape == (32, 32, 3) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert ToyWorldDataset(size=64, length=1)[0]["image"].shape == (64, 64, 3)
    with pytest.raises(IndexError):
        a[20]


def test_render_puts_colours_where_the_spec_says() -> None:
    bg = (240, 240, 240)
    objs = [
        ObjectSpec("circle", "red", size=0.3, position=(0.25, 0.25)),
        ObjectSpec("square", "blue", "twotone", "yellow", size=0.4, position=(0.7, 0.7)),
    ]
    img = np.asarray(render_scene(objs, 32, bg)).astype(int)
    assert np.abs(img[8, 8] - COLOUR_RGB["red"]).max() < 8
    assert np.abs(img[22, 19] - COLOUR_RGB["blue"]).max() < 8  # left half: main colour
    assert np.abs(img[22, 25] - COLOUR_RGB["yellow"]).max() < 8  # right half: second colour
    assert np.abs(img[1, 30] - bg).max() == 0
    ring = np.asarray(render_scene([ObjectSpec("ring", "green", size=0.8)], 32, bg)).astype(int)
    assert np.abs(ring[16, 16] - bg).max() < 8  # hollow centre


def test_captions_match_ground_truth() -> None:
    for i in range(300):
        ex = make_example(i, seed=5)
        parsed = parse_caption(ex.caption)
        assert len(parsed) == len(ex.objects)
        for (shape, colour, pattern, second), obj in zip(parsed, ex.objects, strict=True):
            assert shape == obj.shape
            if colour is not None:  # class-word-only caption otherwise
                assert (colour, pattern, second) == (obj.colour, obj.pattern, obj.pattern_colour)


def test_caption_grammar() -> None:
    objs = [
        ObjectSpec("circle", "red"),
        ObjectSpec("square", "orange", "dots", "blue"),
        ObjectSpec("ring", "green", "twotone", "yellow"),
        ObjectSpec("triangle", "purple", "outline"),
    ]
    assert caption(objs[:1], "a photo of {}") == "a photo of a red circle"
    assert caption(objs[:2]) == "a red circle and an orange square with blue dots"
    assert caption(objs) == (
        "a red circle, an orange square with blue dots, a green and yellow ring"
        " and an outlined purple triangle"
    )
    assert caption(objs[:1], class_word_only=True) == "a circle"
    assert parse_caption(caption(objs, "a photo of {}"))[2] == (
        "ring",
        "green",
        "twotone",
        "yellow",
    )
    with pytest.raises(ValueError):
        parse_caption("a photo of a dog")


def test_concepts_never_sampled_but_their_parts_are(sampled_scenes: list) -> None:
    combos = [o.combo for s in sampled_scenes for o in s.objects]
    assert not set(combos) & EXCLUDED_COMBOS
    assert not {o.combo for i in range(500) for o in make_example(i).objects} & EXCLUDED_COMBOS
    seen = set(combos)
    for c in CONCEPTS.values():
        assert c.caption == f"a photo of {'an' if c.shape[0] in 'aeiou' else 'a'} {c.shape}"
        # Every part is seen on other objects: shape+pattern, colour+pattern, second colour.
        assert any(s == c.shape and p == c.pattern and col != c.colour for s, col, p, _ in seen)
        assert any(col == c.colour and p == c.pattern and s != c.shape for s, col, p, _ in seen)
        if c.pattern_colour is not None:
            assert any(sc == c.pattern_colour and p == c.pattern for _, _, p, sc in seen)
        assert len(near_misses(c.name)) >= 8


def test_sampled_scenes_are_valid(sampled_scenes: list) -> None:
    for scene in sampled_scenes[:1000]:
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        assert len({o.label for o in objs}) == len(objs)  # distinct (colour, shape)
        for a, b in itertools.combinations(objs, 2):
            gap = np.hypot(a.position[0] - b.position[0], a.position[1] - b.position[1])
            assert gap >= (a.size + b.size) / 2
        for o in objs:
            assert o.size / 2 <= min(*o.position, 1 - o.position[0], 1 - o.position[1])
        assert min(scene.background) > 180  # light


def test_render_spec_completes_and_captions() -> None:
    spec = [
        {"shape": "circle", "colour": "red"},
        {"shape": "square", "colour": "blue", "pattern": "dots", "pattern_colour": "yellow"},
    ]
    ex = render_spec(spec, seed=1)
    assert ex.caption == "a photo of a red circle and a blue square with yellow dots"
    assert ex.image.size == (32, 32)
    a, b = ex.objects
    assert np.hypot(a.position[0] - b.position[0], a.position[1] - b.position[1]) > 0.25
    assert render_spec(spec, seed=1).image.tobytes() == ex.image.tobytes()


def test_names_file_lists_every_colour_shape_pair() -> None:
    names = load_names()
    assert names == object_names()
    assert len(names) == len(COLOURS) * len(SHAPES) and "red circle" in names


def test_export_concept_layout(tmp_path, capsys) -> None:
    out = export_concept("dotted_triangle", tmp_path / "c", n=6)
    paths = (out / "images.txt").read_text().splitlines()
    captions = (out / "caption.txt").read_text().splitlines()
    assert len(paths) == len(captions) == 6
    assert set(captions) == {"a photo of a triangle"}
    from PIL import Image

    images = [Image.open(p) for p in paths]
    assert all(im.size == (32, 32) for im in images)
    assert len({im.tobytes() for im in images}) == 6  # varied placements
    main(["--list"])
    assert "dotted_triangle" in capsys.readouterr().out


def test_judge_exact_sets_on_fresh_clean_images(judge: Judge) -> None:
    examples = [make_example(i, seed=987_654, mix={"one": 0.5, "two": 0.5}) for i in range(200)]
    report = evaluate_judge(judge, [e.image for e in examples], [e.objects for e in examples])
    assert report["exact_set_accuracy"] >= 0.95, report
    sets = judge.objects([e.image for e in examples[:4]])
    assert isinstance(sets[0], set) and all(isinstance(t, tuple) for t in sets[0])


def test_judge_detects_concepts_against_near_misses(judge: Judge) -> None:
    rng = np.random.default_rng(31)
    for name, concept in CONCEPTS.items():
        misses = near_misses(name)
        objs = [concept.object(float(rng.uniform(0.45, 0.7))) for _ in range(8)]
        objs += [ObjectSpec(*misses[k], size=0.6) for k in rng.choice(len(misses), 8)]
        images = [render_scene([o], 32, (235, 238, 240)) for o in objs]
        hit = judge.has_concept(images, name)
        assert hit.dtype == torch.bool and hit.shape == (16,)
        accuracy = (hit == torch.arange(16).lt(8)).float().mean().item()
        assert accuracy >= 0.9, (name, hit)


def test_judge_accepts_several_image_formats(judge: Judge) -> None:
    ex = [make_example(i, seed=11) for i in range(4)]
    pil = [e.image for e in ex]
    uint8_hwc = np.stack([np.asarray(im) for im in pil])
    chw = to_batch(pil)
    assert torch.allclose(to_batch(uint8_hwc), chw)
    assert torch.allclose(to_batch(torch.from_numpy(uint8_hwc).permute(0, 3, 1, 2)), chw)
    assert to_batch(torch.nn.functional.interpolate(chw, size=64)).shape == (4, 3, 32, 32)
    assert judge.objects(chw) == judge.objects(pil)
    probs = judge.probs(chw)
    assert set(probs) == {"objects", "concepts", "patterns"}
    assert probs["objects"].shape == (4, len(COLOURS) * len(SHAPES))
    with pytest.raises(KeyError):
        judge.has_concept(chw, "no_such_concept")
