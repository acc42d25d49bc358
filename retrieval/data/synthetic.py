"""The embedded default benchmark: generated clips whose captions need temporal order.

Clips come in pairs, each the other's hard negative (reference/synthetic.md, "Design that
worked"). Static pairs differ in one appearance or position attribute; temporal pairs hold
the same objects with the order of events reversed, and the partner clip draws its own
positions and spans, so the two clips' frame multisets are identically distributed: a model
that ignores frame order is at chance on "own clip vs partner".

Six templates, balanced within every split (pair ``i`` of a split uses template ``i % 6``):

| template | kind | clip vs partner |
|---|---|---|
| ``colour`` | static | two objects; the second object's colour differs |
| ``size`` | static | a big object vs a small one |
| ``side`` | static | an object on the left vs on the right |
| ``motion`` | temporal | an object moves left vs right |
| ``replace`` | temporal | X is replaced by Y vs Y is replaced by X |
| ``recolour`` | temporal | an object turns from colour A to B vs from B to A |

Every clip has three phrasings of its caption. ``generate`` writes real mp4 files (libx264,
yuv420p) into an MSR-VTT-layout folder, so the same reader and decoder serve it::

    root/videos/<video_id>.mp4
    root/MSRVTT_data.json          {"videos": [{video_id, split, id}], "sentences": [{caption, video_id, sen_id}]}
    root/MSRVTT_train.9k.csv       header video_id: the training clips
    root/MSRVTT_val.csv            header video_id: the validation clips
    root/MSRVTT_JSFUSION_test.csv  key,vid_key,video_id,sentence: every caption of every test clip
    root/pairs.json                {video_id: {partner, kind, template}}
    root/vtr_synthetic.json        manifest: generation parameters and completion flag

``retrieval.data.formats`` reads it as ``name="synthetic"`` (validation and test videos with
all their captions, so the multi-caption protocol is exercised). Pairs never straddle splits.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from retrieval.data.video import write_video

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
TEMPLATES = ("colour", "size", "side", "motion", "replace", "recolour")
KINDS = ("static", "temporal")
TEMPLATE_KIND = {name: "static" if i < 3 else "temporal" for i, name in enumerate(TEMPLATES)}
DIFFICULTIES = ("easy", "hard")
SPLITS = ("train", "val", "test")
FPS = 8
FORMAT_VERSION = 1

MANIFEST = "vtr_synthetic.json"
DATA_JSON = "MSRVTT_data.json"
TRAIN_CSV = "MSRVTT_train.9k.csv"
VAL_CSV = "MSRVTT_val.csv"
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
PAIRS_JSON = "pairs.json"
VIDEOS_DIR = "videos"
_OUTPUTS = (MANIFEST, DATA_JSON, TRAIN_CSV, VAL_CSV, TEST_CSV, PAIRS_JSON)
_ENCODER_OPTIONS = {"crf": "18", "preset": "veryfast", "threads": "1"}


class PairInfo(NamedTuple):
    """A clip's hard negative and what tells them apart."""

    partner: str
    kind: str
    template: str


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


_DEFAULTS = {"num_train": 4000, "num_val": 400, "num_test": 400, "seed": 0, "size": 64,
             "num_frames": 16, "difficulty": "easy"}


def _params(num_train: int, num_val: int, num_test: int, seed: int, size: int, num_frames: int,
            difficulty: str) -> dict:
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    for name, count in counts.items():
        if count < 2 or count % 2:
            raise ValueError(f"{name} must be an even number >= 2 (clips come in pairs); got {count}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be even and >= 32 (libx264 yuv420p); got {size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2; got {num_frames}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {DIFFICULTIES}")
    return {**counts, "seed": seed, "size": size, "num_frames": num_frames, "difficulty": difficulty,
            "fps": FPS, "format_version": FORMAT_VERSION}


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(root: str | Path, **params) -> bool:
    """Whether ``root`` holds a finished dataset generated with these ``generate`` arguments.

    Args:
        root: Dataset folder.
        **params: The ``generate`` keyword arguments (``num_train`` ... ``difficulty``);
            missing ones take ``generate``'s defaults.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    expected = _params(**{**_DEFAULTS, **params})
    if manifest is None or manifest.get("params") != expected or not manifest.get("complete"):
        return False
    videos = root / VIDEOS_DIR
    return all((videos / f"{video_id}.mp4").is_file() for video_id in manifest["video_ids"])


def generate(
    root: str | Path,
    num_train: int = 4000,
    num_val: int = 400,
    num_test: int = 400,
    seed: int = 0,
    size: int = 64,
    num_frames: int = 16,
    difficulty: str = "easy",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the synthetic benchmark into ``root`` (MSR-VTT layout, see the module docstring).

    Idempotent: a folder that already holds a complete dataset generated with the same
    parameters is reused as is. Deterministic: the same parameters give byte-identical
    annotation files and identical decoded frames.

    Args:
        root: Output folder (created if needed).
        num_train: Training clips (even: clips come in pairs).
        num_val: Validation clips (even).
        num_test: Test clips (even).
        seed: Random seed.
        size: Frame height and width in pixels (even).
        num_frames: Frames per clip (at ``FPS`` frames per second).
        difficulty: ``"easy"`` (black background, switch in the middle) or ``"hard"`` (grey
            background, noise, smaller objects, a distractor, switch at 35-65 %).
        overwrite: Replace a different dataset or foreign files already in ``root``.
        progress: Show a tqdm progress bar.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` is non-empty and holds something else, and ``overwrite`` is
            False.
        ValueError: On invalid counts, size, frame count or difficulty.
    """
    params = _params(num_train, num_val, num_test, seed, size, num_frames, difficulty)
    root = Path(root)
    if is_complete(root, **{k: params[k] for k in _DEFAULTS}):
        return root
    manifest = _read_manifest(root)
    resumable = manifest is not None and manifest.get("params") == params
    if root.is_dir() and any(root.iterdir()) and not resumable:
        if not overwrite:
            found = (f"a synthetic dataset generated with {manifest.get('params')}" if manifest
                     else "files that are not a vtr synthetic dataset")
            raise FileExistsError(
                f"{root} already holds {found}; requested {params}. "
                "Pass overwrite=True to replace it, or choose another root."
            )
        shutil.rmtree(root / VIDEOS_DIR, ignore_errors=True)
        for name in _OUTPUTS:
            (root / name).unlink(missing_ok=True)
    (root / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(root / MANIFEST, {"params": params, "complete": False, "video_ids": []})

    canvas = _Canvas(size, num_frames, difficulty)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    videos, sentences, pairs = [], [], {}
    split_ids: dict[str, list[str]] = {split: [] for split in SPLITS}
    bar = tqdm(total=sum(counts.values()), desc=f"synthetic clips -> {root}", disable=not progress)
    for split_number, split in enumerate(SPLITS):
        for pair in range(counts[split] // 2):
            rng = np.random.default_rng([seed, split_number, pair])
            template = TEMPLATES[pair % len(TEMPLATES)]
            clips = list(_PAIR_MAKERS[template](canvas, rng))
            if rng.random() < 0.5:  # which variant gets the lower id carries no information
                clips.reverse()
            ids = [f"video{len(videos)}", f"video{len(videos) + 1}"]
            for video_id, partner, clip in zip(ids, ids[::-1], clips):
                write_video(root / VIDEOS_DIR / f"{video_id}.mp4", canvas.render(clip, rng), fps=FPS,
                            options=_ENCODER_OPTIONS)
                videos.append({"video_id": video_id, "split": split, "id": len(videos)})
                for caption in clip.captions:
                    sentences.append({"caption": caption, "video_id": video_id, "sen_id": len(sentences)})
                pairs[video_id] = {"partner": partner, "kind": TEMPLATE_KIND[template], "template": template}
                split_ids[split].append(video_id)
                bar.update()
    bar.close()

    _write_json(root / DATA_JSON, {"info": {"description": "vtr synthetic benchmark", **params},
                                   "videos": videos, "sentences": sentences})
    _write_json(root / PAIRS_JSON, pairs)
    _write_id_csv(root / TRAIN_CSV, split_ids["train"])
    _write_id_csv(root / VAL_CSV, split_ids["val"])
    test_ids = set(split_ids["test"])
    with open(root / TEST_CSV, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        test_sentences = [s for s in sentences if s["video_id"] in test_ids]
        for key, sentence in enumerate(test_sentences):
            video_id = sentence["video_id"]
            writer.writerow([f"ret{key}", video_id.replace("video", "msr"), video_id, sentence["caption"]])
    _write_json(root / MANIFEST, {"params": params, "complete": True,
                                  "video_ids": [video["video_id"] for video in videos]})
    return root


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


def pair_info(root: str | Path) -> dict[str, PairInfo]:
    """Each clip's partner (hard negative), kind (``static``/``temporal``) and template.

    Args:
        root: A folder written by ``generate``.

    Raises:
        FileNotFoundError: ``root`` has no ``pairs.json``.
    """
    path = Path(root) / PAIRS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a generated synthetic dataset")
    return {video_id: PairInfo(**info) for video_id, info in json.loads(path.read_text()).items()}


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _write_id_csv(path: Path, ids: list[str]) -> None:
    path.write_text("video_id\n" + "".join(f"{video_id}\n" for video_id in ids))
