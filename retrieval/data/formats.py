"""Annotation readers: dataset files as the CLIP4Clip lineage lays them out → ``VideoRecord``.

Each reader turns one split of one dataset into ``(video_id, captions)`` rows;
``read_split`` adds the video paths. Formats (reference/protocols.md §1.2-1.3):

- ``msrvtt``: ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (header ``video_id``) with
  every caption from ``MSRVTT_data.json``; test = 1k-A from ``MSRVTT_JSFUSION_test.csv``
  (``key,vid_key,video_id,sentence``; one caption per video in the real file, rows of the
  same video are grouped). MSR-VTT has no validation split: ``val`` is a fixed-seed
  subset of ``val_size`` videos (default ``MSRVTT_VAL_SIZE``) carved out of the 9k list
  (never a test id), and ``train`` / ``train7k`` exclude it, so checkpoints are selected
  on validation, never on test.
- ``synthetic``: the generated benchmark (``retrieval.data.synthetic``): train from the 9k
  csv, val from ``MSRVTT_val.csv``, test from the ids of the JSFusion csv; every split takes
  *all* captions of each video from ``MSRVTT_data.json`` (multi-caption evaluation).
- ``msvd``: ``captions_msvd.json`` (``video_id → [caption, ...]``) with
  ``{train,val,test}_list.txt``; every caption of every video (test: 670 videos, 27,763
  captions).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")
MSRVTT_VAL_SIZE = 450
"""Videos carved out of the MSR-VTT 9k training list as a validation split (5 %) by default."""
MSRVTT_VAL_SEED = 0
CARVED_VALIDATION = {"msrvtt": MSRVTT_VAL_SIZE}
"""Formats without a validation split, and how many training videos they carve for one by default."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split with all its captions.

    Attributes:
        video_id: Dataset id (the file stem).
        path: Video file, or None when only annotations were read.
        captions: Every caption of the video used in this split, in file order.
        split: Split name.
    """

    video_id: str
    path: Path | None
    captions: tuple[str, ...]
    split: str


Rows = list[tuple[str, list[str]]]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return path


def read_id_list(path: str | Path) -> list[str]:
    """Video ids of a one-column csv with header ``video_id`` or of a plain list (one per line).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: A csv without a ``video_id`` column.
    """
    path = _require(Path(path))
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "video_id" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: expected a 'video_id' column, found {reader.fieldnames}")
            return [row["video_id"].strip() for row in reader if row["video_id"].strip()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_jsfusion_csv(path: str | Path) -> dict[str, list[str]]:
    """Captions per video of a JSFusion-format csv (``key,vid_key,video_id,sentence``).

    Rows of the same video are grouped in file order; videos keep their first-seen order.
    """
    path = _require(Path(path))
    captions: dict[str, list[str]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            captions.setdefault(row["video_id"].strip(), []).append(row["sentence"])
    return captions


def read_msrvtt_captions(path: str | Path) -> dict[str, list[str]]:
    """Captions per video from ``MSRVTT_data.json``'s ``sentences`` (file order)."""
    path = _require(Path(path))
    captions: dict[str, list[str]] = {}
    for sentence in json.loads(path.read_text())["sentences"]:
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    return captions


def msrvtt_val_ids(train_ids: list[str], val_size: int = MSRVTT_VAL_SIZE, source: str = "list") -> set[str]:
    """The fixed-seed validation subset carved out of the MSR-VTT 9k training list.

    Args:
        train_ids: The ids to carve from (test ids already removed).
        val_size: How many to carve; at least 1 and fewer than ``len(train_ids)``, so
            training keeps a video.
        source: The list's file, quoted in the error.

    Raises:
        ValueError: An impossible ``val_size``, naming the option and both counts.
    """
    if val_size < 1 or val_size >= len(train_ids):
        raise ValueError(
            f"data.val_size={val_size} but the MSR-VTT train list {source} has {len(train_ids)} ids; "
            f"set data.val_size between 1 and {len(train_ids) - 1}"
        )
    return set(random.Random(MSRVTT_VAL_SEED).sample(sorted(train_ids), val_size))


def _with_captions(ids: list[str], captions: dict[str, list[str]], source: Path) -> Rows:
    missing = [video_id for video_id in ids if video_id not in captions]
    if missing:
        raise ValueError(f"{len(missing)} videos have no caption in {source}, e.g. {missing[:3]}")
    return [(video_id, captions[video_id]) for video_id in ids]


def _read_msrvtt(annotations_dir: Path, split: str, val_size: int | None) -> Rows:
    test_csv = annotations_dir / "MSRVTT_JSFUSION_test.csv"
    if split == "test":
        return list(read_jsfusion_csv(test_csv).items())
    lists = {"train": "MSRVTT_train.9k.csv", "val": "MSRVTT_train.9k.csv", "train7k": "MSRVTT_train.7k.csv"}
    if split not in lists:
        raise ValueError(f"msrvtt has splits {(*lists, 'test')}; got {split!r}")
    train_csv = annotations_dir / "MSRVTT_train.9k.csv"
    train_ids = read_id_list(train_csv)
    test_ids = set(read_jsfusion_csv(test_csv)) if test_csv.is_file() else set()
    carvable = [video_id for video_id in train_ids if video_id not in test_ids]
    overlap = len(train_ids) - len(carvable)
    source = f"{train_csv} (less its {overlap} test ids)" if overlap else str(train_csv)
    val = msrvtt_val_ids(carvable, MSRVTT_VAL_SIZE if val_size is None else val_size, source)
    ids = read_id_list(annotations_dir / lists[split])
    if split == "val":
        log.warning(
            "MSR-VTT has no validation split: using %d videos carved from MSRVTT_train.9k.csv "
            "(data.val_size, seed %d, no test id) and excluding them from training", len(val), MSRVTT_VAL_SEED,
        )
        ids = [video_id for video_id in ids if video_id in val]
    else:
        ids = [video_id for video_id in ids if video_id not in val]
    json_path = annotations_dir / "MSRVTT_data.json"
    return _with_captions(ids, read_msrvtt_captions(json_path), json_path)


def _read_synthetic(annotations_dir: Path, split: str, val_size: int | None) -> Rows:
    if split == "test":
        ids = list(read_jsfusion_csv(annotations_dir / "MSRVTT_JSFUSION_test.csv"))
    elif split in ("train", "val"):
        ids = read_id_list(annotations_dir / ("MSRVTT_train.9k.csv" if split == "train" else "MSRVTT_val.csv"))
    else:
        raise ValueError(f"synthetic has splits ('train', 'val', 'test'); got {split!r}")
    json_path = annotations_dir / "MSRVTT_data.json"
    return _with_captions(ids, read_msrvtt_captions(json_path), json_path)


def _read_msvd(annotations_dir: Path, split: str, val_size: int | None) -> Rows:
    if split not in ("train", "val", "test"):
        raise ValueError(f"msvd has splits ('train', 'val', 'test'); got {split!r}")
    ids = read_id_list(annotations_dir / f"{split}_list.txt")
    json_path = _require(annotations_dir / "captions_msvd.json")
    return _with_captions(ids, json.loads(json_path.read_text()), json_path)


READERS: dict[str, Callable[[Path, str, int | None], Rows]] = {
    "msrvtt": _read_msrvtt,
    "msvd": _read_msvd,
    "synthetic": _read_synthetic,
}
"""Reader per format: ``(annotations_dir, split, val_size)`` → rows; ``val_size`` (None: the
default) is used only by the formats of ``CARVED_VALIDATION``."""


def resolve_video_path(videos_dir: str | Path, video_id: str) -> Path | None:
    """The first existing ``videos_dir/<video_id><ext>`` over ``VIDEO_EXTENSIONS``, else None."""
    for extension in VIDEO_EXTENSIONS:
        path = Path(videos_dir) / f"{video_id}{extension}"
        if path.is_file():
            return path
    return None


def read_split(
    name: str,
    annotations_dir: str | Path,
    split: str,
    videos_dir: str | Path | None = None,
    *,
    val_size: int | None = None,
) -> list[VideoRecord]:
    """Reads one split of a dataset.

    Args:
        name: Format name, a key of ``READERS``.
        annotations_dir: Folder with the dataset's annotation files.
        split: ``train``, ``val`` or ``test`` (``msrvtt`` also has ``train7k``).
        videos_dir: Folder of the video files; None reads annotations only (``path`` None).
        val_size: Videos carved from train as validation by the formats of
            ``CARVED_VALIDATION`` (None: their default); ignored by formats with a
            validation split of their own.

    Returns:
        One record per video, in the annotation file's order.

    Raises:
        ValueError: Unknown format or split, a video without captions, an empty caption
            (the message names the video id), or a ``val_size`` the train list cannot hold.
        FileNotFoundError: A missing annotation file, or (with ``videos_dir``) a missing
            video file (the message names the id and the expected path).
    """
    if name not in READERS:
        raise ValueError(f"unknown dataset format {name!r}; known formats: {sorted(READERS)}")
    records = []
    for video_id, captions in READERS[name](Path(annotations_dir), split, val_size):
        cleaned = tuple(caption.strip() for caption in captions)
        if not cleaned or not all(cleaned):
            raise ValueError(f"{name} {split}: video {video_id!r} has an empty caption or no caption")
        path = None
        if videos_dir is not None:
            path = resolve_video_path(videos_dir, video_id)
            if path is None:
                expected = Path(videos_dir) / f"{video_id}{VIDEO_EXTENSIONS[0]}"
                raise FileNotFoundError(
                    f"video {video_id!r} of {name} {split} not found: {expected} "
                    f"(also tried {', '.join(VIDEO_EXTENSIONS[1:])})"
                )
        records.append(VideoRecord(video_id, path, cleaned, split))
    return records
