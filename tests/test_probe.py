"""The setup probe: what it finds in good, truncated and broken files, and its cache."""

import os
import wave

import av
import numpy as np
import pytest

from retrieval.data.probe import VideoProbe, probe_video, probe_videos
from retrieval.data.video import write_video

FPS = 8


def _frames(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _faststart_clip(path, n: int):
    """An mp4 with its index first (``movflags=+faststart``, as web videos are): a cut file still opens."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"g": "4"}
        for image in _frames(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def _cut(path, keep: float | None = None, drop_bytes: int = 0):
    data = path.read_bytes()
    end = int(len(data) * keep) if keep is not None else len(data) - drop_bytes
    path.write_bytes(data[:end])
    return path


def test_good_clips_report_frames_and_duration(tmp_path):
    assert probe_video(write_video(tmp_path / "a.mp4", _frames(24), fps=FPS)) == VideoProbe(24, 24 / FPS)
    assert probe_video(_faststart_clip(tmp_path / "b.mp4", 20)) == VideoProbe(20, 20 / FPS)
    webm = write_video(tmp_path / "c.webm", _frames(16), fps=FPS, codec="libvpx-vp9")
    assert probe_video(webm) == VideoProbe(16, 16 / FPS)


def test_truncated_clips_are_found(tmp_path):
    index_last = _cut(write_video(tmp_path / "index_last.mp4", _frames(24), fps=FPS), keep=0.6)
    assert probe_video(index_last).error.startswith(("cannot open", "no video stream"))  # its index was at the end
    index_first = probe_video(_cut(_faststart_clip(tmp_path / "index_first.mp4", 24), keep=0.5))
    assert index_first.error.startswith("truncated: the container lists 24 frames but the file holds ")
    assert 0 < index_first.frames < 24
    # one byte short: every frame is listed and present, only decoding the last one fails
    last_byte = probe_video(_cut(_faststart_clip(tmp_path / "last_byte.mp4", 24), drop_bytes=1))
    assert last_byte.frames == 24 and last_byte.error.startswith("the last frames do not decode")
    webm = probe_video(_cut(write_video(tmp_path / "half.webm", _frames(48), fps=FPS, codec="libvpx-vp9"), keep=0.5))
    assert webm.error.startswith("truncated: the container lasts 6.00 s but its video stops at ")


def test_files_that_are_no_video(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_bytes(b"not a video at all")
    with wave.open(str(tmp_path / "audio.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(b"\x00\x00" * 800)
    assert probe_video(tmp_path / "missing.mp4").error == "file not found"
    assert probe_video(tmp_path / "empty.mp4").error == "file is empty (0 bytes)"
    assert probe_video(tmp_path / "text.mp4").error.startswith("cannot open")
    assert probe_video(tmp_path / "audio.wav").error.startswith("no video stream (streams: audio)")


@pytest.fixture
def opens(monkeypatch):
    """Counts the containers PyAV opens."""
    paths = []
    real_open = av.open

    def counting(file, *args, **kwargs):
        paths.append(os.path.basename(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting)
    return paths


def test_cache_reuses_unchanged_files_only(tmp_path, opens):
    clips = [write_video(tmp_path / f"clip{i}.mp4", _frames(8 + i), fps=FPS) for i in range(3)]
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    paths, cache = [*clips, tmp_path / "broken.mp4"], tmp_path / "cache" / "probe.json"
    opens.clear()  # the writes
    first = probe_videos(paths, cache, progress=False)
    assert [p.frames for p in first[:3]] == [8, 9, 10] and first[3].error.startswith("cannot open")
    assert sorted(opens) == ["broken.mp4", "clip0.mp4", "clip1.mp4", "clip2.mp4"]
    opens.clear()
    assert probe_videos(paths, cache, progress=False) == first and opens == []  # failures are cached too
    touched, grown = clips[1].stat(), clips[2].stat()
    os.utime(clips[1], ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))  # same size, newer: probed again
    with open(clips[2], "ab") as handle:  # a byte longer, same mtime: probed again
        handle.write(b"\0")
    os.utime(clips[2], ns=(grown.st_atime_ns, grown.st_mtime_ns))
    assert probe_videos(paths, cache, progress=False) == first
    assert sorted(opens) == ["clip1.mp4", "clip2.mp4"]
    opens.clear()
    assert probe_videos(paths, cache, progress=False) == first and opens == []


def test_unreadable_cache_is_ignored(tmp_path, opens):
    clip = write_video(tmp_path / "clip.mp4", _frames(8), fps=FPS)
    cache = tmp_path / "probe.json"
    cache.write_text("{ not json")
    opens.clear()
    assert probe_videos([clip], cache, progress=False) == [VideoProbe(8, 1.0)] and opens == ["clip.mp4"]
    cache.write_text('{"version": 0, "videos": {}}')  # another probe version's results are not reused
    assert probe_videos([clip], cache, progress=False) == [VideoProbe(8, 1.0)] and len(opens) == 2
    assert probe_videos([clip], cache, progress=False) == [VideoProbe(8, 1.0)] and len(opens) == 2  # rewritten
