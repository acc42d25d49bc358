"""What every annotation reader shares: the record type, file checks, id lists, the carved
validation split and the two policies for listed ids that have no annotation.

The readers themselves live in ``formats.py`` (MSR-VTT, MSVD, synthetic),
``movie_clips.py`` (LSMDC, VATEX) and ``paragraphs.py`` (DiDeMo, ActivityNet).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VAL_SEED = 0
"""Seed of every validation split carved out of a training list."""

Rows = list[tuple[str, list[str]]]
"""``(video_id, captions)`` per video of a split, in the order the official loader serves them."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split with all its captions.

    Attributes:
        video_id: Dataset id (the file stem, or for DiDeMo the whole file name).
        path: Video file, or None when only annotations were read.
        captions: Every caption of the video used in this split, in file order (paragraph
            datasets: one text, the video's sentences joined).
        split: Split name.
    """

    video_id: str
    path: Path | None
    captions: tuple[str, ...]
    split: str


def require(path: Path, dataset: str) -> Path:
    """``path`` if it is a file, else a ``FileNotFoundError`` naming it and the dataset."""
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: annotation file not found: {path} (expected in {path.parent})")
    return path


def read_json(path: Path, dataset: str) -> Any:
    """The parsed JSON file; a missing or malformed file is an error naming it and the dataset."""
    try:
        return json.loads(require(path, dataset).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{dataset}: {path} is not valid JSON: {error}") from error


def read_id_list(path: str | Path, dataset: str = "dataset") -> list[str]:
    """Video ids of a one-column csv with header ``video_id`` or of a plain list (one per line).

    Lines are ``strip()``ped as CLIP4Clip does (X-Pool strips only the newline); blank lines
    are skipped.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: A csv without a ``video_id`` column.
    """
    path = require(Path(path), dataset)
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "video_id" not in (reader.fieldnames or []):
                raise ValueError(f"{dataset}: {path}: expected a 'video_id' column, found {reader.fieldnames}")
            return [row["video_id"].strip() for row in reader if row["video_id"].strip()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def carve_validation(train_ids: list[str], val_size: int, dataset: str, source: str,
                     test_ids: list[str] | tuple[str, ...] = ()) -> set[str]:
    """A fixed-seed validation subset of ``val_size`` ids drawn from a training list.

    ``random.Random(VAL_SEED).sample(sorted(ids), val_size)`` over the list less any test id:
    the same set on every machine and for every order of the list, never a test video. The
    caller excludes it from training. ``val_size=0`` carves nothing: training reads the whole
    list, as the lineage does, and there is no validation split.

    Raises:
        ValueError: ``val_size`` is not in ``0 .. n - 1`` for the ``n`` ids that can be carved
            (the message names ``data.val_size``, the dataset, the list and the counts).
    """
    test = set(test_ids)
    unique = sorted(set(train_ids) - test)
    if not 0 <= val_size < len(unique):
        overlap = len(set(train_ids) & test)
        less = f" (less its {overlap} test ids)" if overlap else ""
        raise ValueError(f"data.val_size={val_size} but the {dataset} train list {source}{less} has {len(unique)} "
                         f"ids; set data.val_size between 0 (no validation split) and {len(unique) - 1}")
    if val_size == 0:
        log.warning("%s: val_size=0, training on all %d videos of %s; no validation split", dataset,
                    len(unique), source)
        return set()
    log.warning("%s has no validation split: carving %d of the %d videos of %s (data.val_size, seed %d, no test "
                "id) as validation and excluding them from training", dataset, val_size, len(unique), source,
                VAL_SEED)
    return set(random.Random(VAL_SEED).sample(unique, val_size))


def drop_unannotated(ids: list[str], captions: dict[str, list[str]], dataset: str, source: Path) -> Rows:
    """Listed ids that have annotations, in list order; the others are dropped and counted in
    the log, as the official loaders of MSR-VTT (train), DiDeMo and ActivityNet drop them."""
    kept = [(video_id, captions[video_id]) for video_id in ids if video_id in captions]
    if len(kept) < len(ids):
        missing = [video_id for video_id in ids if video_id not in captions]
        log.warning("%s: %d of %d listed videos have no annotation in %s and are dropped, e.g. %s",
                    dataset, len(missing), len(ids), source, missing[:3])
    return kept


def require_annotated(ids: list[str], captions: dict[str, list[str]], dataset: str, source: Path) -> Rows:
    """Every listed id with its captions; an id without any is an error naming it, as the
    official loaders that ``assert`` it (MSVD, VATEX, MSR-VTT full val/test) fail."""
    missing = [video_id for video_id in ids if video_id not in captions]
    if missing:
        raise ValueError(f"{dataset}: {len(missing)} listed videos have no caption in {source}, e.g. {missing[:3]}")
    return [(video_id, captions[video_id]) for video_id in ids]
