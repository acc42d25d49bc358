"""The generated benchmark: byte-reproducible clips and their checksum, pairs, temporal reversal,
reuse and overwrite rules."""

import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from retrieval.data import synthetic
from retrieval.data.formats import read_split
from retrieval.data.video import read_frames, write_video

SMALL = {"num_train": 12, "num_val": 12, "num_test": 12}  # 6 pairs per split: every template once


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "a", **SMALL, progress=False)


def test_layout_and_captions(dataset):
    data = json.loads((dataset / synthetic.DATA_JSON).read_text())
    assert len(data["videos"]) == 36 and all((dataset / "videos" / f"{v['video_id']}.mp4").is_file()
                                              for v in data["videos"])
    per_video = Counter(s["video_id"] for s in data["sentences"])
    assert set(per_video.values()) == {3}
    with open(dataset / synthetic.TEST_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_ids = [v["video_id"] for v in data["videos"] if v["split"] == "test"]
    assert Counter(r["video_id"] for r in rows) == {v: 3 for v in test_ids}  # all captions of the test videos
    manifest = json.loads((dataset / synthetic.MANIFEST).read_text())
    assert manifest["complete"] and manifest["encoder"] == synthetic.encoder_build()
    assert manifest["encoder"]["options"]["x264-params"] == "asm=0:mbtree=0"
    for split in ("train", "val", "test"):
        records = read_split("synthetic", dataset, split, dataset / "videos")
        assert len(records) == 12 and all(len(r.captions) == 3 for r in records)


def test_pairs(dataset):
    info = synthetic.pair_info(dataset)
    split = {v["video_id"]: v["split"] for v in json.loads((dataset / synthetic.DATA_JSON).read_text())["videos"]}
    assert set(info) == set(split)
    for video_id, (partner, kind, template) in info.items():
        assert info[partner].partner == video_id and partner != video_id
        assert split[partner] == split[video_id] and info[partner].template == template
        assert kind == synthetic.TEMPLATE_KIND[template]
    for name in ("train", "val", "test"):
        templates = Counter(i.template for v, i in info.items() if split[v] == name)
        assert templates == {t: 2 for t in synthetic.TEMPLATES}  # balanced


def test_deterministic(dataset, tmp_path, monkeypatch):
    # the second generation renders every clip into a buffer at another byte offset: the
    # clips' bytes must not depend on where the frames sit in memory
    render, calls = synthetic._Canvas.render, [0]

    def shifted(self, clip, rng):
        frames = render(self, clip, rng)
        calls[0] += 1
        buffer = np.empty(frames.nbytes + 128, dtype=np.uint8)
        start = (-buffer.ctypes.data) % 64 + calls[0] % 64
        moved = buffer[start:start + frames.nbytes].reshape(frames.shape)
        moved[:] = frames
        return moved

    monkeypatch.setattr(synthetic._Canvas, "render", shifted)
    again = synthetic.generate(tmp_path / "b", **SMALL, progress=False)
    names = synthetic.dataset_files(dataset)
    assert names == synthetic.dataset_files(again) and len(names) == 6 + 36
    for name in names:
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    assert synthetic.dataset_checksum(again) == synthetic.dataset_checksum(dataset)
    other = synthetic.generate(tmp_path / "c", **SMALL, seed=1, progress=False)
    assert (other / synthetic.DATA_JSON).read_bytes() != (dataset / synthetic.DATA_JSON).read_bytes()
    assert synthetic.dataset_checksum(other) != synthetic.dataset_checksum(dataset)


def test_clips_decode_to_the_rendered_frames(tmp_path, monkeypatch):
    rendered = {}
    write = synthetic.write_video

    def keep(path, frames, **kwargs):
        rendered[path.stem] = frames.copy()
        return write(path, frames, **kwargs)

    monkeypatch.setattr(synthetic, "write_video", keep)
    root = synthetic.generate(tmp_path / "e", num_train=6, num_val=6, num_test=6, progress=False)
    error = np.concatenate([np.abs(read_frames(root / "videos" / f"{video_id}.mp4", 16)[0].astype(int) - frames).ravel()
                            for video_id, frames in rendered.items()])
    # 4:2:0 chroma blurs colour edges (a few pixels far off); everywhere else the clip is faithful
    assert error.mean() < 1.5 and np.percentile(error, 95) <= 4


def test_encoder_output_is_the_same_every_time(tmp_path):
    """libx264 with its AVX-512 code and mb-tree gave 2-4 outputs in 12 encodes of each of these
    clips in one process (with other allocations in between); ``ENCODER_OPTIONS`` must give one,
    on any CPU."""
    canvas = synthetic._Canvas(48, 10, "hard")
    for template, seed in (("recolour", 1), ("motion", 2)):
        rng = np.random.default_rng(seed)
        frames = canvas.render(synthetic._PAIR_MAKERS[template](canvas, rng)[0], rng)
        outputs, allocations = set(), []
        for i in range(12):
            allocations.append(np.full(1000 + 7919 * i, i, dtype=np.uint8))  # a different heap each time
            outputs.add(write_video(tmp_path / "clip.mp4", frames, fps=synthetic.FPS,
                                    options=synthetic.ENCODER_OPTIONS).read_bytes())
        assert len(outputs) == 1, template


def test_checksum_covers_every_file_and_nothing_else(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    checksum = synthetic.dataset_checksum(copy)
    assert checksum.startswith("sha256:") and len(checksum) == 7 + 64 and checksum == synthetic.dataset_checksum(dataset)
    (copy / "notes.txt").write_text("not part of the dataset")
    assert synthetic.dataset_checksum(copy) == checksum
    clip = copy / "videos" / "video7.mp4"
    data = bytearray(clip.read_bytes())
    data[-1] ^= 1
    clip.write_bytes(bytes(data))
    assert synthetic.dataset_checksum(copy) != checksum
    clip.unlink()
    with pytest.raises(FileNotFoundError, match="video7.mp4"):
        synthetic.dataset_checksum(copy)
    with pytest.raises(FileNotFoundError, match="no complete"):
        synthetic.dataset_checksum(tmp_path)


def _colours_present(video: np.ndarray) -> set[str]:
    """Palette colours drawn anywhere in the clip."""
    return {name for name, rgb in synthetic.COLOURS.items() if (video == np.array(rgb, dtype=np.uint8)).all(-1).any()}


def _pair(template: str, pair: int, difficulty: str = "easy"):
    canvas = synthetic._Canvas(64, 16, difficulty)
    rng = np.random.default_rng([7, pair])
    clips = synthetic._PAIR_MAKERS[template](canvas, rng)
    return clips, [canvas.render(clip, rng) for clip in clips]


@pytest.mark.parametrize("template", ["replace", "recolour"])
def test_temporal_pairs_are_the_same_frames_reversed(template):
    for pair in range(5):
        (a, b), (video_a, video_b) = _pair(template, pair)
        # order-blind view: the same objects for the same number of frames, in reversed order
        objects_a = Counter((obj.shape, obj.colour, obj.radius) for frame in a.frames for obj in frame)
        assert objects_a == Counter((obj.shape, obj.colour, obj.radius) for frame in b.frames for obj in frame)
        assert _colours_present(video_a) == _colours_present(video_b)
        colours_a = [obj.colour for frame in a.frames for obj in frame]
        colours_b = [obj.colour for frame in b.frames for obj in frame]
        assert colours_a[:8] == colours_b[8:] and colours_a[8:] == colours_b[:8]
        assert colours_a[0] != colours_a[-1]


def test_motion_pairs_move_in_opposite_directions():
    for pair in range(5):
        (left, right), _ = _pair("motion", pair)
        left_x = [frame[0].x for frame in left.frames]
        right_x = [frame[0].x for frame in right.frames]
        assert np.all(np.diff(left_x) < 0) and np.all(np.diff(right_x) > 0)
        assert "left" in left.captions[0] and "right" in right.captions[0]


def test_hard_setting_renders(tmp_path):
    (clip, _), (video, _) = _pair("replace", 0, "hard")
    assert video.shape == (16, 64, 64, 3) and video.std() > 0
    switch = [frame[0].colour for frame in clip.frames].index(clip.frames[-1][0].colour)
    assert 0.35 * 16 - 1 <= switch <= 0.65 * 16 + 1


def test_reuse_is_idempotent(dataset):
    stamp = (dataset / synthetic.DATA_JSON).stat().st_mtime_ns
    assert synthetic.generate(dataset, **SMALL, progress=False) == dataset
    assert (dataset / synthetic.DATA_JSON).stat().st_mtime_ns == stamp
    assert synthetic.is_complete(dataset, **SMALL)
    assert not synthetic.is_complete(dataset, **SMALL, seed=5)


def test_refuses_to_overwrite(tmp_path):
    root = synthetic.generate(tmp_path / "d", num_train=2, num_val=2, num_test=2, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthetic.generate(root, num_train=2, num_val=2, num_test=2, seed=3, progress=False)
    synthetic.generate(root, num_train=2, num_val=2, num_test=2, seed=3, overwrite=True, progress=False)
    assert synthetic.is_complete(root, num_train=2, num_val=2, num_test=2, seed=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a vtr synthetic dataset"):
        synthetic.generate(foreign, num_train=2, num_val=2, num_test=2, progress=False)


def test_invalid_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        synthetic.generate(tmp_path, num_train=3, progress=False)
    with pytest.raises(ValueError, match="difficulty"):
        synthetic.generate(tmp_path, difficulty="medium", progress=False)
    with pytest.raises(FileNotFoundError, match="pairs.json"):
        synthetic.pair_info(tmp_path)
