"""Annotation readers: dataset folders as the CLIP4Clip lineage lays them out → ``VideoRecord``.

``read_split(name, annotations_dir, split, videos_dir=None, val_size=None)`` serves, for one
split, the video ids and per video the captions the official loader of that dataset hands
to its tokenizer (reference/formats.md, with file:line of the official code). The formats:

- ``msrvtt`` (1k-A): ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (header ``video_id``)
  with every caption of ``MSRVTT_data.json``; test = ``MSRVTT_JSFUSION_test.csv``
  (``key,vid_key,video_id,sentence``, one row per caption). The lineage has no validation
  split (CLIP4Clip evaluates "val" on the test csv): ``val`` is a fixed-seed subset of
  ``val_size`` videos (default 450) carved out of the 9k list and excluded from ``train``
  and ``train7k``. ``msrvtt_7k`` is the same format whose ``train`` is ``train7k``.
- ``msrvtt_full``: ``MSRVTT_{train,val,test}.full.csv`` (6,513 / 497 / 2,990) with every
  caption of ``MSRVTT_data.json`` (CLIP2Video). vtr groups a video's sentences by id; the
  official val/test loader asserts they are contiguous in the json (they are in the real file).
- ``msvd``: ``{train,val,test}_list.txt`` with ``captions_msvd.json`` (X-Pool: caption
  strings) or, when the folder holds no json, the lineage's ``raw-captions.pkl`` (CLIP4Clip:
  token lists, served as ``" ".join(tokens)``, punctuation tokens kept apart).
- ``lsmdc``, ``vatex``: ``retrieval.data.movie_clips``; ``didemo``, ``activitynet`` (one
  paragraph per video): ``retrieval.data.paragraphs``.
- ``synthetic``: the generated benchmark (``retrieval.data.synthetic``) in MSR-VTT layout,
  with its own ``MSRVTT_val.csv``; every split takes all captions of each video.

Ids listed without annotations are dropped and counted in the log where the official loader
drops them, and are an error where it asserts. Deliberate difference: the official loaders
silently skip videos they find no file for (LSMDC, DiDeMo, ActivityNet, VATEX); vtr raises,
naming the id and the paths it tried (``on_bad_video="skip"`` drops and logs them instead).
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.data import movie_clips, paragraphs
from retrieval.data.annotations import (
    Rows,
    VideoRecord,
    carve_validation,
    drop_unannotated,
    read_id_list,
    read_json,
    require,
    require_annotated,
)

__all__ = ["READERS", "VideoRecord", "read_id_list", "read_split", "resolve_video_path"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".m4v")
MSRVTT_VAL_SIZE = 450
"""Videos carved out of the MSR-VTT 9k training list as a validation split (5 %)."""


def read_jsfusion_csv(path: str | Path, dataset: str = "msrvtt") -> dict[str, list[str]]:
    """Captions per video of a JSFusion-format csv (``key,vid_key,video_id,sentence``).

    Rows of the same video are grouped in file order; videos keep their first-seen order.
    Sentences are kept as text (pandas, which the official loader uses, would turn ``NA`` or
    ``null`` into NaN; the real file has none).
    """
    path = require(Path(path), dataset)
    captions: dict[str, list[str]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            captions.setdefault(row["video_id"].strip(), []).append(row["sentence"])
    return captions


def read_msrvtt_captions(path: str | Path, dataset: str = "msrvtt") -> dict[str, list[str]]:
    """Captions per video from ``MSRVTT_data.json``'s ``sentences`` (file order)."""
    path = Path(path)
    captions: dict[str, list[str]] = {}
    for sentence in read_json(path, dataset)["sentences"]:
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    return captions


def _read_msrvtt(annotations_dir: Path, split: str, val_size: int, dataset: str = "msrvtt") -> Rows:
    if split == "test":
        return list(read_jsfusion_csv(annotations_dir / "MSRVTT_JSFUSION_test.csv", dataset).items())
    lists = {"train": "MSRVTT_train.9k.csv", "val": "MSRVTT_train.9k.csv", "train7k": "MSRVTT_train.7k.csv"}
    train9k = read_id_list(annotations_dir / "MSRVTT_train.9k.csv", dataset)
    test_path = annotations_dir / "MSRVTT_JSFUSION_test.csv"
    test_ids = list(read_jsfusion_csv(test_path, dataset)) if test_path.is_file() else []
    val = carve_validation(train9k, val_size, dataset, str(annotations_dir / "MSRVTT_train.9k.csv"), test_ids)
    ids = read_id_list(annotations_dir / lists[split], dataset)
    ids = [video_id for video_id in ids if (video_id in val) == (split == "val")]
    json_path = annotations_dir / "MSRVTT_data.json"
    return drop_unannotated(ids, read_msrvtt_captions(json_path, dataset), dataset, json_path)


def _read_msrvtt_7k(annotations_dir: Path, split: str, val_size: int) -> Rows:
    return _read_msrvtt(annotations_dir, "train7k" if split == "train" else split, val_size, "msrvtt_7k")


def _read_msrvtt_full(annotations_dir: Path, split: str, val_size: int) -> Rows:
    ids = read_id_list(annotations_dir / f"MSRVTT_{split}.full.csv", "msrvtt_full")
    json_path = annotations_dir / "MSRVTT_data.json"
    captions = read_msrvtt_captions(json_path, "msrvtt_full")
    if split == "train":  # the train loader walks the json: a csv id without sentences yields nothing
        return drop_unannotated(ids, captions, "msrvtt_full", json_path)
    return require_annotated(ids, captions, "msrvtt_full", json_path)


def _read_synthetic(annotations_dir: Path, split: str, val_size: int) -> Rows:
    if split == "test":
        ids = list(read_jsfusion_csv(annotations_dir / "MSRVTT_JSFUSION_test.csv", "synthetic"))
    else:
        ids = read_id_list(annotations_dir / ("MSRVTT_train.9k.csv" if split == "train" else "MSRVTT_val.csv"),
                           "synthetic")
    json_path = annotations_dir / "MSRVTT_data.json"
    return require_annotated(ids, read_msrvtt_captions(json_path, "synthetic"), "synthetic", json_path)


def read_msvd_captions(annotations_dir: Path) -> tuple[dict[str, list[str]], Path]:
    """MSVD captions per video: ``captions_msvd.json`` if present, else ``raw-captions.pkl``.

    The pickle holds ``{video_id: [[token, ...], ...]}``; each caption is ``" ".join(tokens)``
    as CLIP4Clip serves it (``dataloader_msvd_retrieval.py:70``): nothing re-cased or
    detokenised, an empty token leaves a double space.
    """
    json_path, pkl_path = annotations_dir / "captions_msvd.json", annotations_dir / "raw-captions.pkl"
    if json_path.is_file():
        return read_json(json_path, "msvd"), json_path
    if not pkl_path.is_file():
        raise FileNotFoundError(f"msvd: annotation file not found: expected {json_path} (X-Pool) "
                                f"or {pkl_path} (CLIP4Clip) in {annotations_dir}")
    with open(pkl_path, "rb") as handle:
        raw = pickle.load(handle)
    captions = {}
    for video_id, token_lists in raw.items():
        if not all(isinstance(tokens, list | tuple) for tokens in token_lists):
            raise ValueError(f"msvd: {pkl_path}: video {video_id!r} does not hold token lists")
        captions[video_id] = [" ".join(tokens) for tokens in token_lists]
    return captions, pkl_path


def _read_msvd(annotations_dir: Path, split: str, val_size: int) -> Rows:
    ids = read_id_list(annotations_dir / f"{split}_list.txt", "msvd")
    captions, source = read_msvd_captions(annotations_dir)
    return require_annotated(ids, captions, "msvd", source)


def _same_stem(video_id: str) -> list[str]:
    return [video_id + extension for extension in VIDEO_EXTENSIONS]


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format.

    Attributes:
        read: ``(annotations_dir, split, val_size) -> Rows``.
        splits: The split names ``read`` accepts.
        val_size: Default size of the validation split carved from train, or None where the
            dataset has its own validation split.
        file_names: Candidate video file names of an id, tried in order.
    """

    read: Callable[[Path, str, int], Rows]
    splits: tuple[str, ...] = ("train", "val", "test")
    val_size: int | None = None
    file_names: Callable[[str], list[str]] = _same_stem


READERS: dict[str, DatasetFormat] = {
    "msrvtt": DatasetFormat(_read_msrvtt, ("train", "train7k", "val", "test"), MSRVTT_VAL_SIZE),
    "msrvtt_7k": DatasetFormat(_read_msrvtt_7k, val_size=MSRVTT_VAL_SIZE),
    "msrvtt_full": DatasetFormat(_read_msrvtt_full),
    "msvd": DatasetFormat(_read_msvd),
    "lsmdc": DatasetFormat(movie_clips.read_lsmdc),
    "vatex": DatasetFormat(movie_clips.read_vatex, val_size=movie_clips.VATEX_VAL_SIZE),
    "didemo": DatasetFormat(paragraphs.read_didemo, file_names=paragraphs.didemo_file_names),
    "activitynet": DatasetFormat(paragraphs.read_activitynet, val_size=paragraphs.ACTIVITYNET_VAL_SIZE,
                                 file_names=paragraphs.activitynet_file_names),
    "synthetic": DatasetFormat(_read_synthetic),
}


CARVED_VALIDATION = {name: fmt.val_size for name, fmt in READERS.items() if fmt.val_size is not None}
"""Formats without a validation split, and how many training videos they carve for one by default."""


def video_file_names(name: str | None, video_id: str) -> list[str]:
    """The file names a video of dataset ``name`` may have, in lookup order (None: any format's)."""
    if name is not None:
        return READERS[name].file_names(video_id)
    return list(dict.fromkeys(n for fmt in READERS.values() for n in fmt.file_names(video_id)))


def resolve_video_path(videos_dir: str | Path, video_id: str, name: str | None = None) -> Path | None:
    """The first existing ``videos_dir/<file name>`` of the id's candidate names, else None."""
    for file_name in video_file_names(name, video_id):
        path = Path(videos_dir) / file_name
        if path.is_file():
            return path
    return None


def read_split(
    name: str,
    annotations_dir: str | Path,
    split: str,
    videos_dir: str | Path | None = None,
    val_size: int | None = None,
) -> list[VideoRecord]:
    """Reads one split of a dataset.

    Args:
        name: Format name, a key of ``READERS``.
        annotations_dir: Folder with the dataset's annotation files.
        split: ``train``, ``val`` or ``test`` (``msrvtt`` also has ``train7k``).
        videos_dir: Folder of the video files; None reads annotations only (``path`` None).
        val_size: Videos carved from train as validation, for the formats without a
            validation split (``msrvtt``, ``msrvtt_7k``, ``activitynet``, ``vatex``); None
            takes the format's default (450, 450, 500, 1,300); 0 trains on the whole list as
            the lineage does and leaves no validation split. Ignored by the other formats.

    Returns:
        One record per video, in the order the official loader serves them.

    Raises:
        ValueError: Unknown format or split, an impossible ``val_size``, a video without
            captions where the official loader fails on it, or an empty caption (the message
            names the video id).
        FileNotFoundError: A missing annotation file (the message names it and the dataset),
            or (with ``videos_dir``) a missing video file (the message names the id and the
            paths tried).
    """
    if name not in READERS:
        raise ValueError(f"unknown dataset format {name!r}; known formats: {sorted(READERS)}")
    fmt = READERS[name]
    if split not in fmt.splits:
        raise ValueError(f"{name} has splits {fmt.splits}; got {split!r}")
    val_size = fmt.val_size if val_size is None else val_size
    if split == "val" and fmt.val_size is not None and val_size == 0:
        raise ValueError(f"{name} has no validation split of its own and val_size=0 carves none; "
                         f"pass val_size > 0 (default {fmt.val_size})")
    rows = fmt.read(Path(annotations_dir), split, val_size)
    records = []
    for video_id, captions in rows:
        cleaned = tuple(caption.strip() for caption in captions)
        if not cleaned or not all(cleaned):
            raise ValueError(f"{name} {split}: video {video_id!r} has an empty caption or no caption")
        path = None
        if videos_dir is not None:
            path = resolve_video_path(videos_dir, video_id, name)
            if path is None:
                tried = fmt.file_names(video_id)
                raise FileNotFoundError(f"video {video_id!r} of {name} {split} not found: {Path(videos_dir) / tried[0]} "
                                        f"(also tried {', '.join(tried[1:])})")
        records.append(VideoRecord(video_id, path, cleaned, split))
    return records
