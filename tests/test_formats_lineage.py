"""The lineage's dataset formats (MSR-VTT full / 7k, MSVD's pickle, LSMDC, VATEX, DiDeMo,
ActivityNet) against the real shared files where they exist, and against fixtures written
in the official layout (with its edge cases) where they do not."""

import json
import pickle
from pathlib import Path

import pytest
from conftest import SHARED
import torch

from retrieval.data.datasets import SplitData
from retrieval.data.formats import READERS, read_id_list, read_split, resolve_video_path
from retrieval.metrics import retrieval_metrics

ANNOTATIONS = SHARED / "data" / "annotations"
needs_shared = pytest.mark.skipif(
    not ANNOTATIONS.is_dir(), reason=f"shared annotation files not found at {ANNOTATIONS}"
)


def _ids(records):
    return [r.video_id for r in records]


def _link(src: Path, dst: Path, names) -> Path:
    for name in names:
        (dst / name).symlink_to(src / name)
    return dst


# ------------------------------------------------------------------ MSR-VTT
def _msrvtt_json(root: Path, ids, per_video=2):
    sentences = [{"caption": f"caption {k} of {v}", "video_id": v, "sen_id": per_video * i + k}
                 for i, v in enumerate(ids) for k in range(per_video)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sentences}))


@pytest.fixture
def msrvtt_all(tmp_path):
    """Every shared MSR-VTT csv (linked) beside a generated MSRVTT_data.json of all 10,000 videos."""
    names = ["MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv",
             "MSRVTT_train.full.csv", "MSRVTT_val.full.csv", "MSRVTT_test.full.csv"]
    _link(ANNOTATIONS / "msrvtt", tmp_path, names)
    _msrvtt_json(tmp_path, [f"video{i}" for i in range(10000)])
    return tmp_path


@needs_shared
def test_msrvtt_lineage_counts_without_carving(msrvtt_all):
    assert len(read_split("msrvtt", msrvtt_all, "train", val_size=0)) == 9000
    assert len(read_split("msrvtt", msrvtt_all, "train7k", val_size=0)) == 7010
    assert len(read_split("msrvtt_7k", msrvtt_all, "train", val_size=0)) == 7010
    with pytest.raises(ValueError, match="val_size=0"):
        read_split("msrvtt", msrvtt_all, "val", val_size=0)
    with pytest.raises(ValueError, match="val_size=9000"):
        read_split("msrvtt", msrvtt_all, "val", val_size=9000)
    val = set(_ids(read_split("msrvtt", msrvtt_all, "val", val_size=100)))
    assert len(val) == 100 and not val & set(_ids(read_split("msrvtt", msrvtt_all, "test")))
    assert len(read_split("msrvtt_7k", msrvtt_all, "train", val_size=100)) == 7010 - len(
        val & set(read_id_list(msrvtt_all / "MSRVTT_train.7k.csv")))


@needs_shared
def test_msrvtt_full_counts(msrvtt_all):
    splits = {s: read_split("msrvtt_full", msrvtt_all, s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6513, 497, 2990]
    assert _ids(splits["val"])[:2] == ["video6513", "video6514"] and _ids(splits["test"])[-1] == "video9999"
    assert splits["test"][0].captions == ("caption 0 of video7010", "caption 1 of video7010")


def test_msrvtt_json_edge_cases(tmp_path):
    """Train drops a listed id without sentences (official: the json walk yields nothing);
    full val asserts it; sentences of a video need not be contiguous; duplicates stay."""
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (tmp_path / "MSRVTT_train.full.csv").write_text("video_id\nvideo0\nvideo2\n")
    (tmp_path / "MSRVTT_val.full.csv").write_text("video_id\nvideo1\n")
    sentences = [("video0", "a man sings"), ("video2", "a dog"), ("video0", "a man sings"), ("video0", "he sings")]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": [
        {"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)]}))
    train = read_split("msrvtt", tmp_path, "train", val_size=0)
    assert [(r.video_id, r.captions) for r in train] == [
        ("video0", ("a man sings", "a man sings", "he sings")), ("video2", ("a dog",))]
    assert _ids(read_split("msrvtt_full", tmp_path, "train")) == ["video0", "video2"]
    with pytest.raises(ValueError, match="video1"):
        read_split("msrvtt_full", tmp_path, "val")


# ------------------------------------------------------------------ MSVD
def test_msvd_raw_captions_pickle(tmp_path):
    """CLIP4Clip's token lists are joined by single spaces: punctuation stays apart, an empty
    token leaves a double space (stripped only at the ends), nothing is re-cased."""
    raw = {"-4wsuPCjDBc_5_15": [["a", "man", "is", "eating", "."], ["It", "'s", "a", "", "cat"]],
           "abc_1_2": [["someone", "cooks"]]}
    with open(tmp_path / "raw-captions.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    (tmp_path / "test_list.txt").write_text("abc_1_2\n-4wsuPCjDBc_5_15\n")
    records = read_split("msvd", tmp_path, "test")
    assert [(r.video_id, r.captions) for r in records] == [
        ("abc_1_2", ("someone cooks",)), ("-4wsuPCjDBc_5_15", ("a man is eating .", "It 's a  cat"))]
    (tmp_path / "captions_msvd.json").write_text(json.dumps({"abc_1_2": ["x"], "-4wsuPCjDBc_5_15": ["y"]}))
    assert read_split("msvd", tmp_path, "test")[0].captions == ("x",)  # the json wins when both exist
    (tmp_path / "test_list.txt").write_text("abc_1_2\nmissing_0_1\n")
    with pytest.raises(ValueError, match="missing_0_1"):  # the official loader asserts it
        read_split("msvd", tmp_path, "test")


def test_multi_caption_evaluation_on_msvd_shaped_data(tmp_path):
    """3 videos with 2, 3 and 1 captions: every caption is a t2v query; v2t scores each
    caption group by its best caption."""
    (tmp_path / "captions_msvd.json").write_text(json.dumps(
        {"a_0_1": ["a1", "a2"], "b_0_1": ["b1", "b2", "b3"], "c_0_1": ["c1"]}))
    (tmp_path / "test_list.txt").write_text("a_0_1\nb_0_1\nc_0_1\n")
    split = SplitData.from_records(read_split("msvd", tmp_path, "test"))
    assert split.caption_video.tolist() == [0, 0, 1, 1, 1, 2]
    similarity = torch.tensor([
        [0.9, 0.1, 0.0],   # a1 -> a: rank 1
        [0.2, 0.5, 0.1],   # a2 -> a: rank 2
        [0.3, 0.8, 0.3],   # b1 -> b: rank 1
        [0.4, 0.4, 0.0],   # b2 -> b: ties a -> rank 2
        [0.1, 0.2, 0.7],   # b3 -> b: rank 2
        [0.0, 0.6, 0.5],   # c1 -> c: rank 2
    ])
    metrics = retrieval_metrics(similarity, split.caption_video)
    assert metrics["t2v/R@1"] == pytest.approx(100 * 2 / 6)
    assert metrics["t2v/MnR"] == pytest.approx(10 / 6)
    # v2t: group maxima a=(0.9,0.5,0.1) b=(0.4,0.8,0.7) c=(0,0.6,0.5); video c: b's 0.7 > 0.5 -> rank 2
    assert metrics["v2t/R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["v2t/MnR"] == pytest.approx(4 / 3)


# ------------------------------------------------------------------ LSMDC
@needs_shared
def test_lsmdc_real_test_file():
    records = read_split("lsmdc", ANNOTATIONS / "lsmdc", "test")
    assert len(records) == 1000 == len(set(_ids(records)))
    assert records[0].video_id == "3086_UGLY_TRUTH_00.23.23.000-00.23.28.886"
    assert records[0].captions == ("SOMEONE stands below, hands on her hips.",)


def test_lsmdc_training_file_edge_cases(tmp_path):
    """Repeated clip ids are several captions (duplicates kept); quotes are text; a CRLF or
    trailing whitespace is stripped; a line without six fields is an error naming file:line."""
    lines = [
        "0001_A_00.00.01.000-00.00.02.000\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\t\"Hi,\" SOMEONE says.\r",
        "0002_B_00.00.03.000-00.00.04.000\t00.00.03.000\t00.00.04.000\t00.00.03.000\t00.00.04.000\tHe runs.  \t",
        "0001_A_00.00.01.000-00.00.02.000\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\tShe waves.",
        "0001_A_00.00.01.000-00.00.02.000\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\tShe waves.",
    ]
    (tmp_path / "LSMDC16_annos_training.csv").write_text("\n".join(lines) + "\n", newline="")
    records = read_split("lsmdc", tmp_path, "train")
    assert [(r.video_id, r.captions) for r in records] == [
        ("0001_A_00.00.01.000-00.00.02.000", ('"Hi," SOMEONE says.', "She waves.", "She waves.")),
        ("0002_B_00.00.03.000-00.00.04.000", ("He runs.",)),
    ]
    (tmp_path / "LSMDC16_annos_val.csv").write_text(lines[0] + "\n" + "0003_C\t1\t2\t3\tno sentence\n")
    with pytest.raises(ValueError, match=r"LSMDC16_annos_val.csv:2: expected 6"):
        read_split("lsmdc", tmp_path, "val")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "0002_B_00.00.03.000-00.00.04.000.avi").write_bytes(b"x")
    assert resolve_video_path(videos, "0002_B_00.00.03.000-00.00.04.000", "lsmdc").suffix == ".avi"


# ------------------------------------------------------------------ VATEX
@pytest.fixture
def vatex_dir(tmp_path):
    """The shared VATEX lists (linked) beside a generated vatex_data.json (10 enCap per video)."""
    _link(ANNOTATIONS / "vatex", tmp_path, ["train_list.txt", "test_list.txt"])
    ids = read_id_list(tmp_path / "train_list.txt") + read_id_list(tmp_path / "test_list.txt")
    data = {v: {"enCap": [f" A person does thing {k} in {v}." for k in range(10)], "chCap": ["一个人"] * 10}
            for v in ids}
    (tmp_path / "vatex_data.json").write_text(json.dumps(data))
    return tmp_path


@needs_shared
def test_vatex_counts_and_captions(vatex_dir):
    assert len(read_split("vatex", vatex_dir, "train", val_size=0)) == 25991
    test = read_split("vatex", vatex_dir, "test")
    assert len(test) == 1500 and all(len(r.captions) == 10 for r in test)
    assert test[0].captions[3] == f"A person does thing 3 in {test[0].video_id}."  # enCap, not chCap
    train, val = (set(_ids(read_split("vatex", vatex_dir, s))) for s in ("train", "val"))
    assert len(val) == 1300 and len(train) == 25991 - 1300 and not val & train and not val & set(_ids(test))


def test_vatex_unannotated_id_is_an_error(tmp_path):
    (tmp_path / "test_list.txt").write_text("Ptf_2VRj-V0_000122_000132\nnope_000001_000011\n")
    (tmp_path / "vatex_data.json").write_text(json.dumps({"Ptf_2VRj-V0_000122_000132": {"enCap": ["a"], "chCap": []}}))
    with pytest.raises(ValueError, match="nope_000001_000011"):
        read_split("vatex", tmp_path, "test")


# ------------------------------------------------------------------ DiDeMo
def test_didemo_paragraphs(tmp_path):
    """Descriptions joined per video in json order (not contiguous, duplicates kept), videos in
    first-annotation order, a listed id without annotations dropped, an annotated id outside
    the list ignored, ids keep their extension (one of them ending in .mp4)."""
    a, b = "26292851@N04_4253489686_265c3c8051.m4v", "10025021@N00_5060335519_6f9f53ac28.mp4"
    annotations = [
        {"video": b, "description": "a dog jumps", "times": [[0, 1]], "annotation_id": 1, "num_segments": 6},
        {"video": a, "description": "the man waves", "times": [[2, 2], [2, 3]], "annotation_id": 2},
        {"video": "not_listed.mov", "description": "x", "times": [[0, 0]], "annotation_id": 3},
        {"video": b, "description": "the dog lands", "times": [[1, 2]], "annotation_id": 4},
        {"video": a, "description": "the man waves", "times": [[3, 3]], "annotation_id": 5},
    ]
    (tmp_path / "test_data.json").write_text(json.dumps(annotations))
    (tmp_path / "test_list.txt").write_text(f"{a}\nunannotated.mp4\n{b}\n")
    records = read_split("didemo", tmp_path, "test")
    assert [(r.video_id, r.captions) for r in records] == [
        (b, ("a dog jumps the dog lands",)), (a, ("the man waves the man waves",))]
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / a).write_bytes(b"x")
    (videos / f"{b}.mp4").write_bytes(b"x")
    assert [r.path.name for r in read_split("didemo", tmp_path, "test", videos)] == [f"{b}.mp4", a]


# ------------------------------------------------------------------ ActivityNet
@needs_shared
def test_activitynet_real_counts():
    root = ANNOTATIONS / "activitynet"
    full = read_split("activitynet", root, "train", val_size=0)
    test = read_split("activitynet", root, "test")
    assert len(full) == 10007 and len(test) == 4916
    bad = {"v_WjEh7acrr5o", "v_uTc2-oAxgbc", "v_LURZ8QDfowU"}  # bad_vids.txt: annotated, not listed
    assert not bad & set(_ids(full) + _ids(test))
    assert all(len(r.captions) == 1 for r in full + test)
    assert test[0].captions == ((
        "A man in a red shirt talks to a camera before the camera cuts away to a room full of people playing "
        "professional beer pong and competitive social event.   The man is seen talking again interspersed with "
        "people playing beer pong, winning beer pong trophies and posing with him for still shots.   Several "
        "people hold up award cards, hug and cheer before one last interview with the man and a fade out to "
        "marketing material."),)
    train, val = (_ids(read_split("activitynet", root, s)) for s in ("train", "val"))
    assert len(val) == 500 and len(train) == 9507 and set(train) | set(val) == set(_ids(full))
    assert not set(val) & set(_ids(test))


def test_activitynet_file_names(tmp_path):
    (tmp_path / "QOlSCBRmfWY.mkv").write_bytes(b"x")
    (tmp_path / "v_abc.mp4").write_bytes(b"x")
    assert resolve_video_path(tmp_path, "v_QOlSCBRmfWY", "activitynet").name == "QOlSCBRmfWY.mkv"
    assert resolve_video_path(tmp_path, "v_abc", "activitynet").name == "v_abc.mp4"
    assert resolve_video_path(tmp_path, "v_none", "activitynet") is None


# ------------------------------------------------------------------ every format
EXPECTED_FILE = {
    "msrvtt": "MSRVTT_JSFUSION_test.csv", "msrvtt_7k": "MSRVTT_JSFUSION_test.csv",
    "msrvtt_full": "MSRVTT_test.full.csv", "msvd": "test_list.txt", "lsmdc": "LSMDC16_challenge_1000_publictect.csv",
    "vatex": "test_list.txt", "didemo": "test_list.txt", "activitynet": "val_ids.json",
    "synthetic": "MSRVTT_JSFUSION_test.csv",
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_missing_annotation_file_names_file_and_dataset(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=rf"^{name}: annotation file not found: .*{EXPECTED_FILE[name]}"):
        read_split(name, tmp_path, "test")


def test_data_configs_name_known_formats():
    import yaml

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(__file__).parents[1] / "experiments/data").glob("*.yaml")}
    assert {c["data"]["dataset"] for c in configs.values()} == set(READERS)
    for paragraph_dataset in ("didemo", "activitynet"):  # the lineage's paragraph configs, set on the model (linked)
        assert configs[paragraph_dataset]["model"] == {"init_args": {"num_frames": 64, "max_words": 64}}
