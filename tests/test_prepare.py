"""``vtr prepare``: the lineage's 3 fps / short side 224 / no audio re-encode, resumable."""

import av
import numpy as np
import pytest

from retrieval.cli import main as vtr
from retrieval.data.video import write_video
from retrieval.tools.prepare import plan, prepare_video


def _clip(path, frames, height, width, fps):
    return write_video(path, np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8), fps=fps)


def _probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height, sum(1 for _ in container.decode(stream)), len(container.streams.audio)


def test_landscape_and_portrait_follow_the_lineage_scale(tmp_path):
    # 320x120: a = 2.67 > 1 -> h 224, w = trunc(224 * 320/120 / 2) * 2 = 596; 4 s at 10 fps -> 12 frames at 3 fps
    assert prepare_video(_clip(tmp_path / "wide.mp4", 40, 120, 320, 10), tmp_path / "out_wide.mp4") == 12
    assert _probe(tmp_path / "out_wide.mp4") == (596, 224, 12, 0)
    # 90x160 portrait: w 224, h = trunc(224 * 160/90 / 2) * 2 = 398 (the lineage: 126, squashed); 2 s at 8 fps -> 6
    prepare_video(_clip(tmp_path / "tall.mp4", 16, 160, 90, 8), tmp_path / "out_tall.mp4")
    assert _probe(tmp_path / "out_tall.mp4") == (224, 398, 6, 0)


def test_folder_is_resumable_and_never_touches_originals(tmp_path):
    src, out = tmp_path / "videos", tmp_path / "prepared"
    (src / "sub").mkdir(parents=True)
    _clip(src / "a.mp4", 12, 64, 96, 6)
    _clip(src / "sub" / "b.avi", 12, 64, 96, 6)
    before = {p.name: p.read_bytes() for p in src.rglob("*.*")}
    vtr(["prepare", str(src), "--out", str(out), "--workers", "2"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.mp4", "sub/b.avi"]
    assert {p.name: p.read_bytes() for p in src.rglob("*.*")} == before
    assert plan(src, out) == ([], 2)  # a second run has nothing left to do
    (out / "a.mp4").unlink()
    assert plan(src, out) == ([(src / "a.mp4", out / "a.mp4")], 1)
    with pytest.raises(ValueError, match="never overwritten"):
        plan(src, src)
    with pytest.raises(ValueError, match="never overwritten"):
        plan(src, src / "prepared")


def test_a_broken_file_is_reported_with_its_path(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    (src / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(SystemExit, match="1 videos failed"):
        vtr(["prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert not list((tmp_path / "out").rglob("*.partial"))
