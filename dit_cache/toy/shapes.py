"""Synthetic multi-object scenes, their captions, and an exact concept detector.

A scene is one to three flat-colored shapes (circle, square, upright triangle) on a light
background. Captions name each object as "a <color> <shape>" in left-to-right order, so a
caption and a render describe the same thing and a text-to-image model can be trained on
them. Because the palette and shapes are known exactly, ``detect_objects`` can tell which
concepts an image shows without any learned weights, which makes multi-concept accuracy
(are all the captioned objects there?) measurable for generated images.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 190, 20),
    "purple": (140, 55, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
IMAGE_SIZE = 256

Concept = tuple[str, str]

# Geometry is specified at IMAGE_SIZE and scaled, so every resolution shows the same layout.
_MIN_OBJECT, _MAX_OBJECT, _MARGIN = 56, 104, 8
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``size`` is the side of its bounding square, ``center`` its (x, y) in pixels."""

    color: str
    shape: str
    center: tuple[int, int]
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding square as (left, top, right, bottom), right/bottom exclusive."""
        left, top = self.center[0] - self.size // 2, self.center[1] - self.size // 2
        return left, top, left + self.size, top + self.size


@dataclass(frozen=True)
class Scene:
    """A set of non-overlapping objects drawn on one image."""

    objects: tuple[SceneObject, ...]

    @property
    def concepts(self) -> list[Concept]:
        """(color, shape) pairs in left-to-right order of center x."""
        ordered = sorted(self.objects, key=lambda o: (o.center[0], o.center[1]))
        return [(o.color, o.shape) for o in ordered]

    @property
    def caption(self) -> str:
        return caption(self.concepts)


def _check_concept(color: str, shape: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {sorted(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def caption(objects: Sequence[Concept]) -> str:
    """Caption for 1-3 (color, shape) pairs, e.g. "a red circle, a blue square and a green triangle"."""
    objects = list(objects)
    if not 1 <= len(objects) <= 3:
        raise ValueError(f"a caption needs 1 to 3 objects, got {len(objects)}")
    for color, shape in objects:
        _check_concept(color, shape)
    phrases = [f"a {color} {shape}" for color, shape in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_caption(text: str) -> list[Concept]:
    """Inverse of :func:`caption`; case and extra whitespace are ignored."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    normalized = " ".join(text.lower().split()).rstrip(".")
    if not normalized:
        raise ValueError("cannot parse an empty caption")
    objects = []
    for phrase in re.split(r"\s*,\s*|\s+and\s+", normalized):
        words = phrase.split()
        if len(words) != 3 or words[0] not in ("a", "an"):
            raise ValueError(f"cannot parse {phrase!r} in caption {text!r}; expected 'a <color> <shape>'")
        _check_concept(words[1], words[2])
        objects.append((words[1], words[2]))
    if len(objects) > 3:
        raise ValueError(f"caption {text!r} names {len(objects)} objects; at most 3 are supported")
    return objects


def _separated(a: SceneObject, b: SceneObject, gap: int) -> bool:
    al, at, ar, ab = a.box
    bl, bt, br, bb = b.box
    return al >= br + gap or bl >= ar + gap or at >= bb + gap or bt >= ab + gap


def random_scene(rng: np.random.Generator, num_objects: int, size: int = IMAGE_SIZE) -> Scene:
    """Random scene of ``num_objects`` distinct concepts with non-overlapping bounding squares."""
    if not 1 <= num_objects <= 3:
        raise ValueError(f"num_objects must be 1, 2 or 3, got {num_objects}")
    scale = size / IMAGE_SIZE
    lo, hi = round(_MIN_OBJECT * scale), round(_MAX_OBJECT * scale)
    margin = max(1, round(_MARGIN * scale))
    if hi + 2 * margin > size or lo < 4:
        raise ValueError(f"image size {size} is too small for a scene")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=num_objects, replace=False)
    # Placing the largest objects first makes rejection sampling succeed sooner.
    sides = sorted((int(rng.integers(lo, hi + 1)) for _ in range(num_objects)), reverse=True)
    for _attempt in range(1000):
        placed: list[SceneObject] = []
        for index, side in zip(chosen, sides):
            color, shape = pairs[index]
            for _try in range(100):
                left = int(rng.integers(margin, size - margin - side + 1))
                top = int(rng.integers(margin, size - margin - side + 1))
                obj = SceneObject(color, shape, (left + side // 2, top + side // 2), side)
                if all(_separated(obj, other, margin) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == num_objects:
            return Scene(tuple(placed))
    raise RuntimeError(f"could not place {num_objects} objects in a {size}px image")


# Shares of two- and three-object scenes in the embedded model's training set; the rest have one object.
TWO_OBJECT_FRACTION, THREE_OBJECT_FRACTION = 0.25, 0.05


def check_object_fractions(two: float, three: float, what: str = "object-count fractions") -> None:
    if min(two, three) < 0 or two + three > 1:
        raise ValueError(f"{what} must be >= 0 and sum to <= 1, got two objects {two}, three objects {three}")


def sample_scenes(
    seed: int,
    count: int,
    two_object_fraction: float = TWO_OBJECT_FRACTION,
    three_object_fraction: float = THREE_OBJECT_FRACTION,
    size: int = IMAGE_SIZE,
) -> list[Scene]:
    """``count`` scenes, deterministic for ``seed``; the rest of the fractions are 1-object scenes."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    check_object_fractions(two_object_fraction, three_object_fraction)
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        u = rng.random()
        n = 3 if u < three_object_fraction else 2 if u < three_object_fraction + two_object_fraction else 1
        scenes.append(random_scene(rng, n, size))
    return scenes


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB render of ``scene``; drawn at 4x and box-filtered down so edges are anti-aliased."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        left, top, right, bottom = (v * k for v in obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((left + right) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {list(SHAPES)}")
    # BOX averages exactly, so colors never overshoot the palette as LANCZOS ringing would.
    return canvas.resize((size, size), Image.BOX)


# A pixel counts toward a color only if it is this close (RGB distance) to its nearest palette
# entry; palette entries are >= ~150 apart, so this tolerates generated-image color drift while
# rejecting the half-blended pixels along anti-aliased or blurry edges.
COLOR_TOLERANCE = 90.0
_MIN_AREA_FRACTION = 0.012
# Shape prototypes as (fill of the bounding box, share of the mass in the box's top half).
_SHAPE_FEATURES = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.25)}


def _as_rgb_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot detect objects in an empty {image.width}x{image.height} image")
    if "A" in image.mode or "transparency" in image.info:
        # Transparent pixels carry arbitrary RGB; showing the background there is what a viewer sees.
        backdrop = Image.new("RGBA", image.size, BACKGROUND + (255,))
        image = Image.alpha_composite(backdrop, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _classify_shape(mask: np.ndarray) -> str:
    area = mask.sum()
    fill = area / mask.size
    top_share = mask[: mask.shape[0] // 2].sum() / area if mask.shape[0] > 1 else 0.5
    def distance(shape: str) -> float:
        proto_fill, proto_top = _SHAPE_FEATURES[shape]
        return float(np.hypot(fill - proto_fill, top_share - proto_top))

    return min(_SHAPE_FEATURES, key=distance)


def detect_objects(image: Image.Image) -> list[Concept]:
    """(color, shape) pairs of the objects in ``image``, sorted by center x; no learned weights."""
    pixels = _as_rgb_array(image)
    names = [None, *COLORS]
    palette = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
    # Squared distances via the expanded dot product: one small matmul instead of an HxWx6x3 array.
    squared = (pixels**2).sum(-1, keepdims=True) - 2 * pixels @ palette.T + (palette**2).sum(-1)
    nearest = squared.argmin(axis=-1)
    close = np.take_along_axis(squared, nearest[..., None], -1)[..., 0] <= COLOR_TOLERANCE**2
    min_area = _MIN_AREA_FRACTION * pixels.shape[0] * pixels.shape[1]
    eight_connected = np.ones((3, 3), dtype=bool)
    found = []
    for index in range(1, len(names)):
        mask = (nearest == index) & close
        if mask.sum() < min_area:
            continue
        mask = ndimage.binary_opening(mask, structure=eight_connected)
        labels, _ = ndimage.label(mask, structure=eight_connected)
        for label, region in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[region] == label
            if component.sum() < min_area:
                continue
            center_x = (region[1].start + region[1].stop) / 2
            found.append((center_x, names[index], _classify_shape(component)))
    return [(color, shape) for _, color, shape in sorted(found)]


OUTCOMES = ("all present", "object missing", "attributes swapped", "wrong shape or color")


@dataclass
class ConceptScore:
    """Which of the expected concepts an image shows."""

    expected: list[Concept]
    found: list[Concept]
    missing: list[Concept]
    all_present: bool

    @property
    def outcome(self) -> str:
        """How the image fails its caption, the first of :data:`OUTCOMES` that matches:

        * ``"all present"``;
        * ``"object missing"``: fewer objects found than captioned (a concept dropped, or two merged into one);
        * ``"attributes swapped"``: every captioned color and shape is there, paired differently;
        * ``"wrong shape or color"``: as many objects as captioned, but some drawn with a shape or color
          the caption does not give them.
        """
        if self.all_present:
            return "all present"
        if len(self.found) < len(self.expected):
            return "object missing"
        colors, shapes = (Counter(attribute) for attribute in zip(*self.found))
        if (not Counter(color for color, _ in self.expected) - colors
                and not Counter(shape for _, shape in self.expected) - shapes):
            return "attributes swapped"
        return "wrong shape or color"


def score_image(image: Image.Image, caption_or_objects: str | Sequence[Concept]) -> ConceptScore:
    """Compare the detected objects with a caption or a list of (color, shape) pairs."""
    if isinstance(caption_or_objects, str):
        expected = parse_caption(caption_or_objects)
    else:
        expected = [tuple(pair) for pair in caption_or_objects]
        for color, shape in expected:
            _check_concept(color, shape)
    found = detect_objects(image)
    available = Counter(found)
    missing = []
    for concept in expected:
        if available[concept] > 0:
            available[concept] -= 1
        else:
            missing.append(concept)
    return ConceptScore(expected, found, missing, not missing)


def concepts_present(images: Sequence[Image.Image], captions: Sequence[str | Sequence[Concept]]) -> list[bool]:
    """For each image, whether it shows every concept of its caption."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("concept scoring needs at least one image")
    return [score_image(im, cap).all_present for im, cap in zip(images, captions)]


def concept_accuracy(images: Sequence[Image.Image], captions: Sequence[str | Sequence[Concept]]) -> float:
    """Fraction of images that show every concept of their caption."""
    present = concepts_present(images, captions)
    return sum(present) / len(present)
