"""Annotation readers against the real shared files, plus their error paths."""

import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import SHARED

from retrieval.data.annotations import carve_validation
from retrieval.data.formats import (
    MSRVTT_VAL_SIZE,
    VideoRecord,
    read_id_list,
    read_jsfusion_csv,
    read_msrvtt_captions,
    read_split,
)

ANNOTATIONS = SHARED / "data" / "annotations"
needs_shared = pytest.mark.skipif(
    not ANNOTATIONS.is_dir(), reason=f"shared annotation files not found at {ANNOTATIONS}"
)
MSRVTT, MSVD = ANNOTATIONS / "msrvtt", ANNOTATIONS / "msvd"


@needs_shared
def test_msrvtt_lists():
    assert len(read_id_list(MSRVTT / "MSRVTT_train.9k.csv")) == 9000
    assert len(read_id_list(MSRVTT / "MSRVTT_train.7k.csv")) == 7010


@needs_shared
def test_msrvtt_jsfusion_test_split():
    records = read_split("msrvtt", MSRVTT, "test")
    assert len(records) == 1000 == len({r.video_id for r in records})
    assert all(len(r.captions) == 1 and r.split == "test" and r.path is None for r in records)
    assert records[0] == VideoRecord("video9770", None, ("a person is connecting something to system",), "test")


@pytest.fixture
def msrvtt_dir(tmp_path):
    """The shared MSR-VTT csvs (linked, not copied) beside a generated MSRVTT_data.json."""
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv"):
        (tmp_path / name).symlink_to(MSRVTT / name)
    ids = read_id_list(MSRVTT / "MSRVTT_train.9k.csv")
    sentences = [{"caption": f"caption {k} of {v}", "video_id": v, "sen_id": 2 * i + k}
                 for i, v in enumerate(ids) for k in range(2)]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    return tmp_path


@needs_shared
def test_msrvtt_val_is_carved_from_train(msrvtt_dir):
    train = read_split("msrvtt", msrvtt_dir, "train")
    val = read_split("msrvtt", msrvtt_dir, "val")
    train7k = read_split("msrvtt", msrvtt_dir, "train7k")
    train_ids, val_ids = {r.video_id for r in train}, {r.video_id for r in val}
    assert len(val_ids) == MSRVTT_VAL_SIZE and len(train_ids) == 9000 - MSRVTT_VAL_SIZE
    assert not train_ids & val_ids and not {r.video_id for r in train7k} & val_ids
    assert val_ids == {r.video_id for r in read_split("msrvtt", msrvtt_dir, "val")}  # fixed seed
    assert all(len(r.captions) == 2 for r in train + val)  # every caption of the json


@needs_shared
def test_msrvtt_default_carve_is_unchanged():
    """The 450 ids carved before val_size existed (recorded at commit dce8ff8)."""
    val = carve_validation(read_id_list(MSRVTT / "MSRVTT_train.9k.csv"), MSRVTT_VAL_SIZE, "msrvtt", "9k",
                           list(read_jsfusion_csv(MSRVTT / "MSRVTT_JSFUSION_test.csv")))
    in_order = sorted(val, key=lambda video_id: int(video_id[5:]))
    assert in_order[:6] == ["video1", "video13", "video19", "video50", "video56", "video62"]
    assert in_order[-3:] == ["video9970", "video9987", "video9988"]
    digest = hashlib.sha256(",".join(sorted(val)).encode()).hexdigest()
    assert digest == "3b010809c275b0a144e1b9c3d0c0b9cd745ab1cc7cd8127d0ed36c96ae313224"


@needs_shared
def test_msrvtt_val_size(msrvtt_dir):
    val = {r.video_id for r in read_split("msrvtt", msrvtt_dir, "val", val_size=30)}
    train = {r.video_id for r in read_split("msrvtt", msrvtt_dir, "train", val_size=30)}
    assert len(val) == 30 and len(train) == 8970 and not val & train


def _small_msrvtt(root: Path, train_ids: list[str], test_ids: list[str]) -> Path:
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in train_ids))
    rows = "".join(f"ret{i},msr{i},{v},caption of {v}\n" for i, v in enumerate(test_ids))
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + rows)
    sentences = [{"caption": f"caption of {v}", "video_id": v, "sen_id": i} for i, v in enumerate(train_ids)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    return root


def test_msrvtt_val_size_larger_than_the_train_list(tmp_path):
    root = _small_msrvtt(tmp_path, [f"video{i}" for i in range(120)], [f"video{i}" for i in range(200, 210)])
    message = (f"data.val_size=450 but the msrvtt train list {root / 'MSRVTT_train.9k.csv'} has 120 ids; "
               "set data.val_size between 0 (no validation split) and 119")
    with pytest.raises(ValueError) as error:
        read_split("msrvtt", root, "val")
    assert str(error.value) == message
    with pytest.raises(ValueError, match="data.val_size=120 but"):
        read_split("msrvtt", root, "train", val_size=120)  # training would keep no video
    assert len(read_split("msrvtt", root, "train", val_size=119)) == 1


def test_msrvtt_carve_never_takes_a_test_id(tmp_path):
    """A train list that also holds test ids: those are never carved as validation."""
    train_ids = [f"video{i}" for i in range(100)]
    root = _small_msrvtt(tmp_path, train_ids, train_ids[:50])
    val = {r.video_id for r in read_split("msrvtt", root, "val", val_size=49)}
    assert val == set(random.Random(0).sample(sorted(train_ids[50:]), 49))
    with pytest.raises(ValueError, match=r"\(less its 50 test ids\) has 50 ids; set data.val_size between 0 \(no validation split\) and 49"):
        read_split("msrvtt", root, "val", val_size=50)


@needs_shared
def test_msvd_every_caption():
    test = read_split("msvd", MSVD, "test")
    assert len(test) == 670 and sum(len(r.captions) for r in test) == 27763
    assert len(read_split("msvd", MSVD, "train")) == 1200
    assert len(read_split("msvd", MSVD, "val")) == 100


def test_msrvtt_json_caption_reader(tmp_path):
    path = tmp_path / "MSRVTT_data.json"
    path.write_text(json.dumps({"info": {}, "videos": [{"video_id": "video0", "split": "train"}], "sentences": [
        {"caption": "a man sings", "video_id": "video0", "sen_id": 0},
        {"caption": "a cat jumps", "video_id": "video1", "sen_id": 1},
        {"caption": "someone is singing", "video_id": "video0", "sen_id": 2},
    ]}))
    assert read_msrvtt_captions(path) == {"video0": ["a man sings", "someone is singing"], "video1": ["a cat jumps"]}


def _tiny_msvd(root: Path, captions: dict) -> Path:
    (root / "captions_msvd.json").write_text(json.dumps(captions))
    (root / "test_list.txt").write_text("".join(f"{v}\n" for v in captions))
    return root


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="MSRVTT_JSFUSION_test.csv"):
        read_split("msrvtt", tmp_path, "test")
    (tmp_path / "test_list.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="captions_msvd.json"):
        read_split("msvd", tmp_path, "test")


def test_empty_caption_names_the_video(tmp_path):
    _tiny_msvd(tmp_path, {"clip_a": ["a dog runs"], "clip_b": ["a cat", "  "]})
    with pytest.raises(ValueError, match="clip_b"):
        read_split("msvd", tmp_path, "test")


def test_unknown_format_and_split(tmp_path):
    with pytest.raises(ValueError, match="msrvtt.*msvd.*synthetic"):
        read_split("kinetics", tmp_path, "test")
    with pytest.raises(ValueError, match="splits"):
        read_split("msvd", tmp_path, "holdout")


def test_video_paths(tmp_path):
    _tiny_msvd(tmp_path, {"clip_a": ["a dog runs"], "clip_b": ["a cat sleeps"]})
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip_a.mp4").write_bytes(b"x")
    (videos / "clip_b.webm").write_bytes(b"x")
    records = read_split("msvd", tmp_path, "test", videos)
    assert [r.path for r in records] == [videos / "clip_a.mp4", videos / "clip_b.webm"]
    (videos / "clip_b.webm").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip_b.*clip_b\.mp4"):
        read_split("msvd", tmp_path, "test", videos)
