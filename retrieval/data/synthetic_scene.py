"""The synthetic benchmark's world and its renderer: the palette, the shapes, the objects of
a frame, a clip's frames with its captions, and the ``_Canvas`` that places objects and draws
them into uint8 frames (easy or hard setting).

What is drawn for each template lives in ``retrieval.data.synthetic_templates``; the dataset
writer and the public API in ``retrieval.data.synthetic``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "cyan": (40, 215, 225),
    "magenta": (215, 50, 215),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
DIFFICULTIES = ("easy", "hard")


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: tuple[int, int, int]
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class _Clip:
    """One generated clip: the objects of every frame and its caption phrasings."""

    frames: list[list[_Object]]
    captions: tuple[str, ...]


class _Canvas:
    """Geometry of one setting: frame size, object radii, where objects may be placed."""

    def __init__(self, size: int, num_frames: int, difficulty: str) -> None:
        self.size, self.num_frames, self.hard = size, num_frames, difficulty == "hard"
        self.radius = max(3.0, (6 if self.hard else 8) * size / 64)
        self.big, self.small = 1.5 * self.radius, 0.6 * self.radius
        self.margin = self.big + 1
        ys, xs = np.mgrid[0:size, 0:size]
        self.xs, self.ys = xs + 0.5, ys + 0.5

    def position(self, rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
        """A random centre whose x lies in the fraction ``[low, high]`` of the usable width."""
        span = self.size - 2 * self.margin
        x = self.margin + span * rng.uniform(low, high)
        return x, self.margin + span * rng.uniform()

    def switch_frame(self, rng: np.random.Generator) -> int:
        """First frame after an identity/colour switch: the middle, or 35-65 % when hard."""
        if not self.hard:
            return self.num_frames // 2
        return int(rng.integers(round(0.35 * self.num_frames), round(0.65 * self.num_frames) + 1))

    def mask(self, obj: _Object) -> np.ndarray:
        dx, dy = self.xs - obj.x, self.ys - obj.y
        if obj.shape == "square":
            return (np.abs(dx) <= obj.radius) & (np.abs(dy) <= obj.radius)
        if obj.shape == "circle":
            return dx * dx + dy * dy <= obj.radius * obj.radius
        depth = dy + obj.radius  # upward triangle: apex at the top, base 2r wide at the bottom
        return (depth >= 0) & (dy <= obj.radius) & (np.abs(dx) <= depth / 2)

    def render(self, clip: _Clip, rng: np.random.Generator) -> np.ndarray:
        """uint8 frames ``[T, size, size, 3]``; the hard setting adds a grey background,
        a static grey distractor and ±25 pixel noise."""
        background = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        if self.hard:
            level = int(rng.integers(60, 121))
            background[:] = level
            x, y = self.position(rng)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            background[self.mask(_Object(shape, (0, 0, 0), x, y, self.radius))] = level + 80
        video = np.empty((len(clip.frames), self.size, self.size, 3), dtype=np.uint8)
        for t, objects in enumerate(clip.frames):
            frame = background.copy()
            for obj in objects:
                frame[self.mask(obj)] = obj.colour
            video[t] = frame
        if self.hard:
            noise = rng.integers(-25, 26, size=video.shape, dtype=np.int16)
            video = np.clip(video.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        return video
