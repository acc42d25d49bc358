"""What the synthetic benchmark shows and says: the six pair templates (each draws a clip and
its hard-negative partner with their captions) and ``still_frames``, the single captioned
frames the tiny backbone is pretrained on.

Templates and what tells a pair apart are listed in ``retrieval.data.synthetic``'s docstring.
Every random draw goes through the ``rng`` passed in, in a fixed order: the written benchmark
depends on it.
"""

from __future__ import annotations

import numpy as np

from retrieval.data.synthetic_scene import COLOURS, SHAPES, _Canvas, _Clip, _Object

TEMPLATES = ("colour", "size", "side", "motion", "replace", "recolour")
KINDS = ("static", "temporal")
TEMPLATE_KIND = {name: "static" if i < 3 else "temporal" for i, name in enumerate(TEMPLATES)}


def _a(word: str) -> str:
    """The word with its indefinite article ("an orange", "a red")."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _distinct(rng: np.random.Generator, options: tuple[str, ...] | list[str], k: int) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _static(canvas: _Canvas, objects: list[_Object]) -> list[list[_Object]]:
    return [objects] * canvas.num_frames


def _colour_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape1, shape2 = (SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
    colour1, colour2, colour3 = _distinct(rng, list(COLOURS), 3)

    def clip(second: str) -> _Clip:
        first_left = rng.random() < 0.5  # each clip draws its own layout
        x1, y1 = canvas.position(rng, *((0.0, 0.2) if first_left else (0.8, 1.0)))
        x2, y2 = canvas.position(rng, *((0.8, 1.0) if first_left else (0.0, 0.2)))
        objects = [
            _Object(shape1, COLOURS[colour1], x1, y1, canvas.radius),
            _Object(shape2, COLOURS[second], x2, y2, canvas.radius),
        ]
        captions = (
            f"{_a(colour1)} {shape1} and {_a(second)} {shape2}",
            f"{_a(second)} {shape2} and {_a(colour1)} {shape1}",
            f"a {shape1} in {colour1} next to a {shape2} in {second}",
        )
        return _Clip(_static(canvas, objects), captions)

    return clip(colour2), clip(colour3)


def _size_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = _distinct(rng, list(COLOURS), 1)[0]

    def clip(big: bool) -> _Clip:
        x, y = canvas.position(rng)
        radius = canvas.big if big else canvas.small
        word, synonym = ("big", "large") if big else ("small", "tiny")
        captions = (
            f"a {word} {colour} {shape}",
            f"a {synonym} {colour} {shape}",
            f"{_a(colour)} {shape} that is {word}",
        )
        return _Clip(_static(canvas, [_Object(shape, COLOURS[colour], x, y, radius)]), captions)

    return clip(True), clip(False)


def _side_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = _distinct(rng, list(COLOURS), 1)[0]

    def clip(side: str) -> _Clip:
        x, y = canvas.position(rng, *((0.0, 0.25) if side == "left" else (0.75, 1.0)))
        captions = (
            f"{_a(colour)} {shape} on the {side}",
            f"{_a(colour)} {shape} on the {side} side",
            f"on the {side} there is {_a(colour)} {shape}",
        )
        return _Clip(_static(canvas, [_Object(shape, COLOURS[colour], x, y, canvas.radius)]), captions)

    return clip("left"), clip("right")


def _motion_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = _distinct(rng, list(COLOURS), 1)[0]

    def clip(direction: str) -> _Clip:
        # Both directions draw an unordered span the same way: the positions visited are
        # identically distributed and only their order tells the clips apart.
        while True:
            (x0, y), (x1, _) = canvas.position(rng), canvas.position(rng)
            if abs(x1 - x0) >= canvas.size / 3:
                break
        start, end = (max(x0, x1), min(x0, x1)) if direction == "left" else (min(x0, x1), max(x0, x1))
        steps = np.linspace(start, end, canvas.num_frames)
        frames = [[_Object(shape, COLOURS[colour], float(x), y, canvas.radius)] for x in steps]
        other = "right" if direction == "left" else "left"
        captions = (
            f"{_a(colour)} {shape} moves {direction}",
            f"{_a(colour)} {shape} moves to the {direction}",
            f"{_a(colour)} {shape} slides from {other} to {direction}",
        )
        return _Clip(frames, captions)

    return clip("left"), clip("right")


def _sequence(canvas: _Canvas, rng: np.random.Generator, first: _Object, second: _Object) -> list[list[_Object]]:
    switch = canvas.switch_frame(rng)
    return [[first]] * switch + [[second]] * (canvas.num_frames - switch)


def _replace_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape_x, shape_y = (SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
    colour_x, colour_y = _distinct(rng, list(COLOURS), 2)
    named = {"x": (colour_x, shape_x), "y": (colour_y, shape_y)}

    def clip(order: str) -> _Clip:
        (c1, s1), (c2, s2) = named[order[0]], named[order[1]]
        x, y = canvas.position(rng)
        first = _Object(s1, COLOURS[c1], x, y, canvas.radius)
        second = _Object(s2, COLOURS[c2], x, y, canvas.radius)
        captions = (
            f"{_a(c1)} {s1} is replaced by {_a(c2)} {s2}",
            f"{_a(c1)} {s1} changes into {_a(c2)} {s2}",
            f"first {_a(c1)} {s1}, then {_a(c2)} {s2}",
        )
        return _Clip(_sequence(canvas, rng, first, second), captions)

    return clip("xy"), clip("yx")


def _recolour_pair(canvas: _Canvas, rng: np.random.Generator) -> tuple[_Clip, _Clip]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour_a, colour_b = _distinct(rng, list(COLOURS), 2)

    def clip(before: str, after: str) -> _Clip:
        x, y = canvas.position(rng)
        first = _Object(shape, COLOURS[before], x, y, canvas.radius)
        second = _Object(shape, COLOURS[after], x, y, canvas.radius)
        captions = (
            f"a {shape} turns from {before} to {after}",
            f"{_a(before)} {shape} becomes {after}",
            f"a {shape} changes colour from {before} to {after}",
        )
        return _Clip(_sequence(canvas, rng, first, second), captions)

    return clip(colour_a, colour_b), clip(colour_b, colour_a)


_PAIR_MAKERS = {
    "colour": _colour_pair,
    "size": _size_pair,
    "side": _side_pair,
    "motion": _motion_pair,
    "replace": _replace_pair,
    "recolour": _recolour_pair,
}


def still_frames(num: int, seed: int = 0, size: int = 64, difficulty: str = "easy") -> tuple[np.ndarray, list[str]]:
    """Single frames of the benchmark's world with their static descriptions.

    The material the tiny backbone is pretrained on, the way CLIP is pretrained on image-text
    pairs: one or two objects with a colour, a shape, a size (big / small / plain) and a side
    (left / middle / right), drawn by the same renderer as the clips. Descriptions say nothing
    about time; the verbs of the temporal captions are only learned when fine-tuning.

    Args:
        num: Number of frames.
        seed: Random seed (the same seed gives the same frames and descriptions).
        size: Frame height and width in pixels.
        difficulty: ``"easy"`` or ``"hard"`` (background, noise, distractor).

    Returns:
        ``(frames uint8 [num, size, size, 3], descriptions)``.
    """
    canvas = _Canvas(size, 1, difficulty)
    rng = np.random.default_rng([seed, 7919])
    frames = np.empty((num, size, size, 3), dtype=np.uint8)
    descriptions = []
    for i in range(num):
        phrases, objects = [], []
        for _ in range(1 + int(rng.random() < 0.4)):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size_word, radius = [("", canvas.radius), ("big ", canvas.big), ("small ", canvas.small)][int(rng.integers(3))]
            x, y = canvas.position(rng)
            third = (x - canvas.margin) / (size - 2 * canvas.margin)
            side = "on the left" if third < 1 / 3 else "on the right" if third > 2 / 3 else "in the middle"
            objects.append(_Object(shape, COLOURS[colour], x, y, radius))
            phrases.append(f"{_a(size_word + colour)} {shape} {side}")
        frames[i] = canvas.render(_Clip([objects], ()), rng)[0]
        descriptions.append(" and ".join(phrases))
    return frames, descriptions
