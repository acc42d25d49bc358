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
    root/vtr_synthetic.json        manifest: generation parameters, completion flag, encoder build

Generation is byte-reproducible: the same parameters give the same files, on any machine
with the same PyAV build (its bundled FFmpeg and x264), whatever the CPU (``ENCODER_OPTIONS``);
``dataset_checksum`` is the one number to compare.

``retrieval.data.formats`` reads it as ``name="synthetic"`` (validation and test videos with
all their captions, so the multi-caption protocol is exercised). Pairs never straddle splits.

The code is split in three: the world and its renderer (``synthetic_scene``), the pair
templates and still frames (``synthetic_templates``), and, here, the dataset writer
(manifest, captions, splits, the MSR-VTT-layout files) with the public API, which
re-exports the names other code uses from the two.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from tqdm.auto import tqdm

from retrieval.data.synthetic_scene import COLOURS, DIFFICULTIES, SHAPES, _Canvas  # noqa: F401  (re-exported)
from retrieval.data.synthetic_templates import (  # noqa: F401  (re-exported)
    _PAIR_MAKERS,
    KINDS,
    TEMPLATE_KIND,
    TEMPLATES,
    still_frames,
)
from retrieval.data.video import write_video

SPLITS = ("train", "val", "test")
FPS = 8
FORMAT_VERSION = 2
"""Bumped whenever the same parameters would give other bytes; part of the cache folder's name.
2: yuv420p converted in numpy and libx264 pinned to deterministic settings (``ENCODER_OPTIONS``)."""

MANIFEST = "vtr_synthetic.json"
DATA_JSON = "MSRVTT_data.json"
TRAIN_CSV = "MSRVTT_train.9k.csv"
VAL_CSV = "MSRVTT_val.csv"
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
PAIRS_JSON = "pairs.json"
VIDEOS_DIR = "videos"
_OUTPUTS = (MANIFEST, DATA_JSON, TRAIN_CSV, VAL_CSV, TEST_CSV, PAIRS_JSON)
ENCODER_OPTIONS = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "asm=0:mbtree=0"}
"""libx264 settings that make a clip's bytes a function of its frames and the x264 build alone.

Measured with PyAV 18.1 (x264 core 165) on an AVX-512 CPU, encoding the same yuv420p frames
100-150 times in one process: with x264's default (AVX-512) assembly and macroblock-tree rate
control, 4-8 distinct outputs, even for the first (I) frame; with ``mbtree=0``, or with
``asm=0``, or with x264 limited to AVX2 or SSSE3 code, one. The assembly also changes the
output between CPU levels (SSE2 vs SSSE3 and up), so ``asm=0`` (x264's C code) removes the CPU
from the result, and ``mbtree=0`` takes the floating-point lookahead out of rate control. The
cost, once per cache: the default benchmark's 4,600 clips took 29-35 s on this 2-core CPU,
against 23 s with x264's assembly and 16.5 s before (swscale, assembly, mb-tree); the files are
as large (21 MB). ``threads=1``: x264's output depends on its thread count, which would
otherwise follow the machine's cores."""


class PairInfo(NamedTuple):
    """A clip's hard negative and what tells them apart."""

    partner: str
    kind: str
    template: str


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
    files (clips included; ``dataset_checksum``).

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
                            options=ENCODER_OPTIONS)
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
    _write_json(root / MANIFEST, {"params": params, "complete": True, "encoder": encoder_build(),
                                  "video_ids": [video["video_id"] for video in videos]})
    return root


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


def encoder_build() -> dict:
    """What the clips' bytes depend on besides the parameters: the PyAV release and the FFmpeg
    it bundles (whose libx264 it links), and ``ENCODER_OPTIONS``. Recorded in the manifest."""
    return {"pyav": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "libavformat": ".".join(map(str, av.library_versions["libavformat"])), "options": ENCODER_OPTIONS}


def dataset_files(root: str | Path) -> list[str]:
    """The files a complete generated dataset consists of, relative to ``root``, sorted: the
    annotation files and every clip its manifest lists (nothing else in the folder).

    Raises:
        FileNotFoundError: ``root`` holds no complete generated dataset.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{root} holds no complete generated synthetic dataset (no finished {MANIFEST})")
    names = [*_OUTPUTS, *(f"{VIDEOS_DIR}/{video_id}.mp4" for video_id in manifest["video_ids"])]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {len(missing)} of its dataset's files, e.g. {missing[0]}")
    return sorted(names)


def dataset_checksum(root: str | Path) -> str:
    """``"sha256:<hex>"`` over a generated dataset: each of ``dataset_files(root)`` in sorted
    order, as its relative name (UTF-8, ``/``-separated), a NUL byte, its size as 8 bytes
    little-endian and its bytes. Equal on two machines exactly when every clip and annotation
    file is byte-identical (the clips are, for the same PyAV/FFmpeg/x264 build: ``ENCODER_OPTIONS``).

    Raises:
        FileNotFoundError: ``root`` holds no complete generated dataset.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for name in dataset_files(root):
        data = (root / name).read_bytes()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _write_id_csv(path: Path, ids: list[str]) -> None:
    path.write_text("video_id\n" + "".join(f"{video_id}\n" for video_id in ids))
