"""Tests for the synthetic scenes, captions and the weight-free concept detector."""

from collections import Counter
from itertools import product

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dit_cache.toy.shapes import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    OUTCOMES,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    concept_accuracy,
    concepts_present,
    detect_objects,
    parse_caption,
    random_scene,
    render,
    sample_scenes,
    score_image,
)

ALL_CONCEPTS = list(product(COLORS, SHAPES))


def _held_out_scenes(count, size=IMAGE_SIZE):
    # Seeds far from those used to build training sets, with every object count represented.
    scenes = []
    for seed in range(10_000, 10_000 + count):
        rng = np.random.default_rng(seed)
        scenes.append(random_scene(rng, 1 + seed % 3, size))
    return scenes


def _exact(image, scene):
    return Counter(detect_objects(image)) == Counter(scene.concepts)


def test_clean_renders_are_detected_exactly():
    scenes = _held_out_scenes(300)
    detected = [(s.concepts, detect_objects(render(s))) for s in scenes]
    failures = [(want, got) for want, got in detected if Counter(want) != Counter(got)]
    rate = 1 - len(failures) / len(scenes)
    assert rate >= 0.99, f"exact-match rate {rate:.3f} on {len(scenes)} scenes; first failures: {failures[:5]}"


def test_detection_tolerates_blur_noise_and_color_shift():
    rng = np.random.default_rng(0)
    scenes = _held_out_scenes(60)
    hits = 0
    for scene in scenes:
        blurred = np.asarray(render(scene).filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
        shifted = blurred + rng.uniform(-20, 20, size=3) + rng.normal(0, 6, blurred.shape)
        hits += _exact(Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)), scene)
    assert hits / len(scenes) >= 0.95, f"exact-match rate {hits / len(scenes):.3f} on degraded renders"


@pytest.mark.parametrize("n", [1, 2])
def test_caption_round_trip(n):
    for objects in product(ALL_CONCEPTS, repeat=n):
        text = caption(objects)
        assert parse_caption(text) == list(objects)
        assert parse_caption("  " + text.upper().replace(" ", "   ") + " ") == list(objects)


def test_caption_formats():
    assert caption([("red", "circle")]) == "a red circle"
    assert caption([("red", "circle"), ("blue", "square")]) == "a red circle and a blue square"
    three = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert caption(three) == "a red circle, a blue square and a green triangle"
    assert parse_caption(caption(three)) == three


@pytest.mark.parametrize(
    "objects, word",
    [([("pink", "circle")], "pink"), ([("red", "hexagon")], "hexagon"), ([("red", "circle"), ("blue", "star")], "star")],
)
def test_caption_rejects_unknown_words(objects, word):
    with pytest.raises(ValueError, match=word):
        caption(objects)
    text = " and ".join(f"a {c} {s}" for c, s in objects)
    with pytest.raises(ValueError, match=word):
        parse_caption(text)


@pytest.mark.parametrize("count", [0, 4])
def test_caption_rejects_bad_object_counts(count):
    with pytest.raises(ValueError):
        caption(ALL_CONCEPTS[:count])


@pytest.mark.parametrize("text", ["", "red circle", "a red", "two red circles", "a red circle and"])
def test_parse_caption_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_sample_scenes_is_deterministic():
    assert sample_scenes(3, 50) == sample_scenes(3, 50)
    assert sample_scenes(3, 50) != sample_scenes(4, 50)
    assert [render(s).tobytes() for s in sample_scenes(5, 3)] == [render(s).tobytes() for s in sample_scenes(5, 3)]


def test_sample_scenes_object_count_fractions():
    scenes = sample_scenes(0, 2000, two_object_fraction=0.25, three_object_fraction=0.05)
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) <= {1, 2, 3}
    assert abs(counts[2] / 2000 - 0.25) < 0.04, counts
    assert abs(counts[3] / 2000 - 0.05) < 0.02, counts


@pytest.mark.parametrize("size", [IMAGE_SIZE, 128])
def test_objects_are_inside_distinct_and_separated(size):
    scale = size / IMAGE_SIZE
    margin = round(8 * scale)
    for scene in sample_scenes(1, 400, two_object_fraction=0.4, three_object_fraction=0.4, size=size):
        assert len(set(scene.concepts)) == len(scene.objects)
        boxes = []
        for obj in scene.objects:
            assert obj.color in COLORS and obj.shape in SHAPES
            assert round(56 * scale) <= obj.size <= round(104 * scale)
            left, top = obj.center[0] - obj.size // 2, obj.center[1] - obj.size // 2
            assert left >= margin and top >= margin
            assert left + obj.size <= size - margin and top + obj.size <= size - margin
            boxes.append((left, top, left + obj.size, top + obj.size))
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                gap_x = max(b[0] - a[2], a[0] - b[2])
                gap_y = max(b[1] - a[3], a[1] - b[3])
                assert max(gap_x, gap_y) >= margin, (scene, a, b)


def test_render_draws_shapes_at_their_positions():
    obj = SceneObject("blue", "triangle", (128, 128), 100)
    pixels = np.asarray(render(Scene((obj,))))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert tuple(pixels[0, 0]) == BACKGROUND
    assert tuple(pixels[170, 128]) == COLORS["blue"]  # base of an upright triangle is wide
    assert tuple(pixels[85, 88]) == BACKGROUND  # top-left corner of its box is empty


def test_concepts_are_left_to_right():
    right = SceneObject("red", "circle", (200, 60), 60)
    left = SceneObject("green", "square", (50, 180), 60)
    scene = Scene((right, left))
    assert scene.concepts == [("green", "square"), ("red", "circle")]
    assert scene.caption == "a green square and a red circle"


def test_blank_and_noise_images():
    assert detect_objects(Image.new("RGB", (256, 256), BACKGROUND)) == []
    assert detect_objects(Image.new("RGB", (256, 256), (255, 255, 255))) == []
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    found = detect_objects(Image.fromarray(noise))
    assert isinstance(found, list) and all(pair in ALL_CONCEPTS for pair in found)


def test_other_modes_are_accepted():
    scene = _held_out_scenes(3)[2]
    image = render(scene)
    assert Counter(detect_objects(image.convert("RGBA"))) == Counter(scene.concepts)
    assert Counter(detect_objects(image.convert("P"))) == Counter(scene.concepts)
    gray = detect_objects(image.convert("L"))
    assert isinstance(gray, list) and all(pair in ALL_CONCEPTS for pair in gray)
    transparent = Image.new("RGBA", (64, 64), (215, 40, 40, 0))
    assert detect_objects(transparent) == []


@pytest.mark.parametrize("size", [128, 512])
def test_other_image_sizes(size):
    for scene in _held_out_scenes(6, size)[:3]:
        assert _exact(render(scene, size), scene)
    for scene in _held_out_scenes(6)[3:]:
        assert _exact(render(scene).resize((size, size), Image.BICUBIC), scene)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        detect_objects(Image.new("RGB", (0, 0)))
    with pytest.raises(TypeError, match="PIL"):
        detect_objects(np.zeros((64, 64, 3), dtype=np.uint8))


def test_score_image():
    objects = (SceneObject("red", "circle", (70, 128), 80), SceneObject("blue", "square", (180, 128), 80))
    image = render(Scene(objects))
    text = "a red circle and a blue square"
    score = score_image(image, text)
    assert score.all_present and score.missing == []
    assert sorted(score.found) == sorted(score.expected) == sorted(parse_caption(text))
    other = score_image(image, "a green triangle")
    assert not other.all_present and other.missing == [("green", "triangle")]
    assert score_image(image, [("blue", "square")]).all_present
    # Duplicates count: one red circle does not satisfy two.
    assert score_image(image, [("red", "circle"), ("red", "circle")]).missing == [("red", "circle")]
    assert concept_accuracy([image, image], [text, "a green triangle"]) == 0.5
    assert concepts_present([image, image], [text, "a green triangle"]) == [True, False]
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        concepts_present([image, image], [text])


@pytest.mark.parametrize("drawn, outcome", [
    ([("red", "circle"), ("blue", "square")], "all present"),
    ([("red", "circle"), ("blue", "square"), ("green", "triangle")], "all present"),
    ([("red", "circle")], "object missing"),
    ([("red", "square"), ("blue", "circle")], "attributes swapped"),
    ([("red", "circle"), ("blue", "triangle")], "wrong shape or color"),
    ([("red", "circle"), ("purple", "square")], "wrong shape or color"),
])
def test_outcome_names_how_an_image_fails_its_caption(drawn, outcome):
    centers = [(50, 128), (128, 128), (206, 128)]
    objects = tuple(SceneObject(color, shape, center, 64) for (color, shape), center in zip(drawn, centers))
    score = score_image(render(Scene(objects)), "a red circle and a blue square")
    assert sorted(score.found) == sorted(drawn)  # the detector sees what was drawn
    assert score.outcome == outcome and outcome in OUTCOMES
