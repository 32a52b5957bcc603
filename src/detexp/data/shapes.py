"""The embedded default dataset: generated shapes in Pascal VOC format.

``python -m detexp train`` must run end to end with no downloads, so it trains
on this: coloured circles, squares, triangles and crosses on a noisy textured
background, written as a real VOC folder (JPEGs, XML, ImageSets/Main) so the
exact same reading code runs as for Pascal VOC. Shapes are solid and contrast
with the background, so a small Faster R-CNN learns them from scratch on a
CPU in a few minutes; image sizes vary by +-20% so resizing and box
handling are exercised with different sizes.

Determinism: each image is drawn from its own RNG seeded by ``(seed, index)``,
so the same parameters give byte-identical XML and identical pixels.

Box convention (as in VOC): integer 1-based pixel indices; a shape covering
0-based pixel columns ``c0..c1`` is written ``xmin = c0 + 1``, ``xmax = c1 + 1``.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES_CLASSES = ("circle", "square", "triangle", "cross")

# Bump when the generator's output changes, so ensure_shapes stops reusing old caches.
GENERATOR_VERSION = 1

JPEG_QUALITY = 90
SIZE_JITTER = (0.8, 1.2)  # image width/height as a fraction of image_size
SHAPE_SIDE = (0.12, 0.45)  # shape side as a fraction of the image's shorter side
DIFFICULT_BELOW = 0.14  # shapes smaller than this fraction are marked difficult (~6% of objects)
MAX_OBJECTS = 4
EMPTY_FRACTION = 0.02  # images with no objects (negatives), at least one per dataset
MAX_OVERLAP = 0.1  # at most this fraction of the smaller box may be covered by another box
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between a shape and the background under it
NOISE_SIGMA = 8.0


@dataclass(frozen=True)
class _Shape:
    label: str
    box: tuple[int, int, int, int]  # VOC 1-based xmin, ymin, xmax, ymax
    difficult: bool


def generate_shapes(
    root: Path, num_train: int = 400, num_val: int = 100, image_size: int = 256, seed: int = 0
) -> Path:
    """Write a VOC-format shapes dataset into ``root`` and return ``root``.

    Writes ``JPEGImages/*.jpg``, ``Annotations/*.xml`` and ``ImageSets/Main/``
    ``train.txt``, ``val.txt`` and ``trainval.txt``; ids are ``000001``... with
    the first ``num_train`` in train. Existing files of the same names are
    overwritten; use :func:`ensure_shapes` for a cached, atomic copy.
    """
    _check_params(num_train, num_val, image_size)
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    total = num_train + num_val
    ids = [f"{i + 1:06d}" for i in range(total)]
    empty = _empty_indices(total, seed)
    for index, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        image, shapes = _draw_image(rng, image_size, with_objects=index not in empty)
        # 4:4:4 chroma: with default 4:2:0 subsampling a shape that differs from the
        # background mostly in hue gets a 2 px colour smear, and its box is no longer tight.
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY, subsampling=0)
        xml = _annotation_xml(image_id, image.size, shapes)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")

    splits = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for split, split_ids in splits.items():
        text = "".join(f"{i}\n" for i in split_ids)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(text, encoding="utf-8")
    return root


def shapes_dirname(num_train: int, num_val: int, image_size: int, seed: int) -> str:
    """The cache folder name: every parameter that changes the output, plus the version."""
    return f"shapes-v{GENERATOR_VERSION}-train{num_train}-val{num_val}-size{image_size}-seed{seed}"


def ensure_shapes(
    cache_dir: Path,
    *,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Return ``cache_dir/<name encoding the params>``, generating it first if absent.

    Generation writes into a private temporary folder that is renamed into place
    only when complete, so a crashed run never leaves a half-written dataset and
    concurrent callers (several Ray workers on one node) each see either nothing
    or the finished folder. If two callers race, the loser discards its copy;
    both copies are identical anyway.
    """
    _check_params(num_train, num_val, image_size)
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / shapes_dirname(num_train, num_val, image_size, seed)
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_shapes(tmp, num_train, num_val, image_size, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: rename onto a non-empty folder fails.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_params(num_train: int, num_val: int, image_size: int) -> None:
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    # Below this the smallest shapes are a few pixels wide and stop being shapes.
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64, got {image_size}")


def _empty_indices(total: int, seed: int) -> set[int]:
    """Which images get no objects: ~EMPTY_FRACTION, at least one when there are 2+ images."""
    if total < 2:
        return set()
    count = max(1, round(total * EMPTY_FRACTION))
    rng = np.random.default_rng([seed, 0x5E1EC7, total])
    return set(rng.choice(total, size=count, replace=False).tolist())


# --------------------------------------------------------------------------- drawing


def _draw_image(
    rng: np.random.Generator, image_size: int, with_objects: bool
) -> tuple[Image.Image, list[_Shape]]:
    width, height = (int(round(image_size * rng.uniform(*SIZE_JITTER))) for _ in range(2))
    background = _background(rng, width, height)
    canvas = Image.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    shapes: list[_Shape] = []
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1)) if with_objects else 0
    for _ in range(n_objects):
        shape = _place_shape(rng, draw, background, [s.box for s in shapes])
        if shape is not None:
            shapes.append(shape)
    # Noise over everything (shapes included) so nothing is a perfectly flat colour.
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, NOISE_SIGMA, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), shapes


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted, smoothly varying texture: coarse random colours upsampled, uint8 [H, W, 3]."""
    base = rng.uniform(60, 190, size=3)
    coarse = base + rng.normal(0, 25, size=(6, 6, 3))
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth)


def _place_shape(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, background: np.ndarray, taken: list
) -> _Shape | None:
    """Draw one random shape where it barely overlaps others; None if no place was found."""
    height, width = background.shape[:2]
    short_side = min(width, height)
    fraction = rng.uniform(*SHAPE_SIDE)
    side = max(8, int(round(fraction * short_side)))
    label = SHAPES_CLASSES[int(rng.integers(len(SHAPES_CLASSES)))]
    variant = int(rng.integers(4))  # triangle orientation
    for _ in range(30):
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        if all(
            _overlap((x0, y0, x0 + side, y0 + side), _to_pixel_box(b)) <= MAX_OVERLAP for b in taken
        ):
            break
    else:
        return None
    under = background[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3).mean(axis=0)
    colour = _contrasting_colour(rng, under)
    mask = Image.new("L", (width, height), 0)
    for target, fill in ((draw, colour), (ImageDraw.Draw(mask), 255)):
        _draw_shape(target, label, variant, (x0, y0, side), fill=fill)
    left, top, right, bottom = mask.getbbox()  # right/bottom exclusive, 0-based
    return _Shape(label, (left + 1, top + 1, right, bottom), bool(fraction < DIFFICULT_BELOW))


def _to_pixel_box(voc_box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    xmin, ymin, xmax, ymax = voc_box
    return xmin - 1, ymin - 1, xmax, ymax


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection area over the smaller box's area (boxes as 0-based, end-exclusive)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour far (in RGB) from the background under the shape."""
    best, best_distance = (255, 255, 255), -1.0
    for _ in range(12):
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
        colour = np.array([r, g, b]) * 255
        distance = float(np.linalg.norm(colour - under))
        if distance > best_distance:
            best, best_distance = tuple(int(c) for c in colour), distance
        if distance >= MIN_COLOUR_DISTANCE:
            break
    if best_distance < MIN_COLOUR_DISTANCE:
        # Rare: the background is itself bright and colourful; near-black always stands out.
        best = (20, 20, 20)
    return best


def _draw_shape(
    draw: ImageDraw.ImageDraw, label: str, variant: int, square: tuple[int, int, int], fill
) -> None:
    """Draw a filled shape inside the square [x0, x0 + side) x [y0, y0 + side), ``square``
    being ``(x0, y0, side)``."""
    x0, y0, side = square
    x1, y1 = x0 + side - 1, y0 + side - 1
    if label == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif label == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif label == "triangle":
        mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
        points = {
            0: [(mid_x, y0), (x1, y1), (x0, y1)],  # pointing up
            1: [(x0, y0), (x1, y0), (mid_x, y1)],  # down
            2: [(x0, mid_y), (x1, y0), (x1, y1)],  # left
            3: [(x0, y0), (x1, mid_y), (x0, y1)],  # right
        }[variant]
        draw.polygon(points, fill=fill)
    elif label == "cross":
        arm = max(2, side // 3)
        lo = (side - arm) // 2
        draw.rectangle((x0 + lo, y0, x0 + lo + arm - 1, y1), fill=fill)
        draw.rectangle((x0, y0 + lo, x1, y0 + lo + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {label!r}")


# --------------------------------------------------------------------------- XML


def _annotation_xml(image_id: str, size: tuple[int, int], shapes: list[_Shape]) -> str:
    """VOC annotation XML, written by hand so the bytes are stable across library versions."""
    width, height = size
    objects = "".join(
        f"""	<object>
		<name>{s.label}</name>
		<pose>Unspecified</pose>
		<truncated>0</truncated>
		<difficult>{int(s.difficult)}</difficult>
		<bndbox>
			<xmin>{s.box[0]}</xmin>
			<ymin>{s.box[1]}</ymin>
			<xmax>{s.box[2]}</xmax>
			<ymax>{s.box[3]}</ymax>
		</bndbox>
	</object>
"""
        for s in shapes
    )
    return f"""<annotation>
	<folder>shapes</folder>
	<filename>{image_id}.jpg</filename>
	<source>
		<database>detexp generated shapes</database>
	</source>
	<size>
		<width>{width}</width>
		<height>{height}</height>
		<depth>3</depth>
	</size>
	<segmented>0</segmented>
{objects}</annotation>
"""
