"""Paragraph-to-video datasets: DiDeMo and ActivityNet Captions, one text per video.

Both serve each video's sentences joined into one paragraph, as CLIP4Clip does
(``" ".join`` in annotation order; sentence times are discarded), and are read at 64 frames
and 64 words by the lineage configs (``experiments/data/didemo.yaml``, ``activitynet.yaml``).

- ``didemo`` (CLIP4Clip ``dataloader_didemo_retrieval.py:42-108``): ``{split}_list.txt``
  (collaborative-experts split) and LocalizingMoments' ``{split}_data.json``, a list of
  ``{"video", "description", "times", "annotation_id", ...}``. The json is walked in file
  order; a video's descriptions need not be contiguous and duplicates are kept. Served
  videos: listed and annotated, in first-annotation order; listed ids without an annotation
  are dropped (logged). Ids are the ``video`` value with its original Flickr extension
  (``26292851@N04_4253489686_265c3c8051.m4v``); the file is ``<id>`` (raw download) or
  ``<id>.mp4`` (the AWS download).
- ``activitynet`` (CLIP4Clip ``dataloader_activitynet_retrieval.py:43-122``): train =
  ``train_ids.json`` + ``train.json``; test = ``val_ids.json`` + ``val_1.json`` (the
  lineage's "val" is its test split). ``val_2.json`` annotates the same videos as ``val_1``,
  so it is not a validation split: ``val`` is carved from the training list (``val_size``,
  default 500 = 5 %). Served videos: the id list in order, deduplicated, keeping the ids the
  json annotates (the real lists have 15 and 9 others, dropped and logged). Ids are
  ``v_<youtube id>``; the file is ``<youtube id>.mp4`` (CLIP4Clip) or ``v_<youtube id>.mp4``
  (the official download names), other extensions allowed.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.data.annotations import Rows, carve_validation, drop_unannotated, read_id_list, read_json

ACTIVITYNET_VAL_SIZE = 500
"""Videos carved out of ActivityNet's training list as a validation split (5 % of 10,007)."""
ACTIVITYNET_FILES = {"train": ("train_ids.json", "train.json"), "test": ("val_ids.json", "val_1.json")}
_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".m4v")


def paragraph(sentences: list[str]) -> str:
    """One text from a video's sentences, joined with single spaces as the official code does
    (ActivityNet's sentences after the first start with a space: the join keeps it)."""
    return " ".join(sentences)


def read_didemo(annotations_dir: Path, split: str, val_size: int | None) -> Rows:
    """One paragraph per listed, annotated video of ``{split}_list.txt`` / ``{split}_data.json``."""
    listed = set(read_id_list(annotations_dir / f"{split}_list.txt", "didemo"))
    json_path = annotations_dir / f"{split}_data.json"
    annotations = read_json(json_path, "didemo")
    if not isinstance(annotations, list):
        raise ValueError(f"didemo: {json_path}: expected a list of annotations, found {type(annotations).__name__}")
    descriptions: dict[str, list[str]] = {}
    for number, annotation in enumerate(annotations):
        if "video" not in annotation or "description" not in annotation:
            raise ValueError(f"didemo: {json_path}: annotation {number} lacks 'video' or 'description'")
        if annotation["video"] in listed:
            descriptions.setdefault(annotation["video"], []).append(annotation["description"])
    order = list(descriptions) + sorted(listed - descriptions.keys())  # unannotated ids last: dropped below
    rows = drop_unannotated(order, descriptions, "didemo", json_path)
    return [(video_id, [paragraph(texts)]) for video_id, texts in rows]


def read_activitynet(annotations_dir: Path, split: str, val_size: int) -> Rows:
    """One paragraph per video of the split's id list that its json annotates."""
    ids_name, json_name = ACTIVITYNET_FILES["test" if split == "test" else "train"]
    ids = list(dict.fromkeys(read_json(annotations_dir / ids_name, "activitynet")))
    json_path = annotations_dir / json_name
    data = read_json(json_path, "activitynet")
    sentences = {}
    for video_id in ids:
        if video_id in data:
            if not isinstance(data[video_id].get("sentences"), list):
                raise ValueError(f"activitynet: {json_path}: video {video_id!r} has no 'sentences' list")
            sentences[video_id] = data[video_id]["sentences"]
    rows = drop_unannotated(ids, sentences, "activitynet", json_path)
    if split != "test":
        val = carve_validation([video_id for video_id, _ in rows], val_size, "activitynet", ids_name)
        rows = [row for row in rows if (row[0] in val) == (split == "val")]
    return [(video_id, [paragraph(texts)]) for video_id, texts in rows]


def didemo_file_names(video_id: str) -> list[str]:
    """``<id>`` as downloaded from Flickr, else the AWS download ``<id>.mp4``."""
    return [video_id, f"{video_id}.mp4"]


def activitynet_file_names(video_id: str) -> list[str]:
    """``<youtube id>.<ext>`` (CLIP4Clip strips ``v_``), then ``v_<youtube id>.<ext>``."""
    stems = [video_id[2:], video_id] if video_id.startswith("v_") else [video_id]
    return [stem + extension for stem in stems for extension in _EXTENSIONS]
