"""LSMDC and VATEX: one short clip per id, several captions per clip.

- ``lsmdc`` (CLIP4Clip ``dataloader_lsmdc_retrieval.py:44-70``): ``LSMDC16_annos_training.csv``
  (train), ``LSMDC16_annos_val.csv`` (val), ``LSMDC16_challenge_1000_publictect.csv`` (test,
  1,000 clips). Despite the suffix the files are tab-separated without a header, each line
  ``CLIP_ID START_ALIGNED END_ALIGNED START_EXTRACTED END_EXTRACTED SENTENCE``. Each line is
  ``strip()``ped and must split on tabs into exactly six fields (the official loader asserts
  it: a tab inside a sentence, an empty sentence or a blank line aborts it, and is an error
  naming the file and line here). The sentence is field six verbatim (quotes are text, no csv
  quoting). Every line is a caption; a clip id on several lines has several captions.
  Clip ids contain dots (``3086_UGLY_TRUTH_00.23.23.000-00.23.28.886``); files are
  ``<clip id>.avi``.
- ``vatex`` (CLIP2Video ``dataloader_vatexEnglish_frame.py:50-82``): ``train_list.txt`` /
  ``test_list.txt`` (the HGR test split CLIP2Video evaluates, 1,500 videos) and
  ``vatex_data.json`` = ``{id: {"enCap": [10 str], "chCap": [...]}}``; every English caption
  verbatim, ``chCap`` unused; a listed id absent from the json is an error (the official
  ``assert``). The lineage has no validation split ("val" raises in CLIP2Video): ``val`` is
  carved from ``train_list.txt`` (``val_size``, default 1,300 = 5 %). CLIP2Video reads
  pre-extracted frame folders ``<id>/``; vtr decodes ``<id>.mp4``.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.data.annotations import Rows, carve_validation, read_id_list, read_json, require, require_annotated

LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
VATEX_VAL_SIZE = 1300
"""Videos carved out of VATEX's training list as a validation split (5 % of 25,991)."""


def read_lsmdc_file(path: Path) -> dict[str, list[str]]:
    """Sentences per clip id of one LSMDC16 annotation file, in file order."""
    captions: dict[str, list[str]] = {}
    with open(require(path, "lsmdc"), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.strip().split("\t")
            if len(fields) != 6:
                raise ValueError(f"lsmdc: {path}:{number}: expected 6 tab-separated fields "
                                 f"(clip id, 4 times, sentence), found {len(fields)}")
            captions.setdefault(fields[0], []).append(fields[5])
    return captions


def read_lsmdc(annotations_dir: Path, split: str, val_size: int | None) -> Rows:
    """Every sentence of every clip of the split's file (no validation carving: LSMDC has one)."""
    return list(read_lsmdc_file(annotations_dir / LSMDC_FILES[split]).items())


def read_vatex(annotations_dir: Path, split: str, val_size: int) -> Rows:
    """Every ``enCap`` caption of each listed video, list order; ``val`` carved from train."""
    if split == "test":
        ids = read_id_list(annotations_dir / "test_list.txt", "vatex")
    else:
        train = read_id_list(annotations_dir / "train_list.txt", "vatex")
        val = carve_validation(train, val_size, "vatex", "train_list.txt")
        ids = [video_id for video_id in train if (video_id in val) == (split == "val")]
    json_path = annotations_dir / "vatex_data.json"
    data = read_json(json_path, "vatex")
    captions = {}
    for video_id in ids:
        if video_id in data:
            if "enCap" not in data[video_id]:
                raise ValueError(f"vatex: {json_path}: video {video_id!r} has no 'enCap' captions")
            captions[video_id] = list(data[video_id]["enCap"])
    return require_annotated(ids, captions, "vatex", json_path)
