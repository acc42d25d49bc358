"""PyAV decoding and the frame sampler: round trips, chunk order, padding, bad input."""

import wave

import numpy as np
import pytest
import torch

from retrieval.data import video
from retrieval.data.video import VideoDecodeError, read_frames, sample_indices, write_video

STEP = 10  # red channel of frame t is STEP * t


def _colour_clip(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = (STEP * t, 255 - STEP * t, 128)
    return frames


def _frame_numbers(frames: np.ndarray) -> np.ndarray:
    """Which source frame each decoded frame is, read back from its red channel."""
    return np.round(frames[:, :, :, 0].mean(axis=(1, 2)) / STEP).astype(int)


@pytest.fixture(scope="module")
def clip24(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip24.mp4", _colour_clip(24), fps=8,
                       options={"g": "4"})


def test_round_trip_uniform(clip24):
    frames, mask = read_frames(clip24, 8)
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 48, 3)
    assert mask.dtype == bool and mask.all()
    expected = sample_indices(24, 8)
    np.testing.assert_array_equal(expected, [1, 4, 7, 10, 13, 16, 19, 22])  # segment middles
    np.testing.assert_array_equal(_frame_numbers(frames), expected)
    reference = _colour_clip(24)[expected].astype(int)
    assert np.abs(frames.astype(int) - reference).max() <= 8  # codec tolerance


def test_seeking_path_matches_sequential(clip24, monkeypatch):
    sequential, _ = read_frames(clip24, 8, segments=4)
    monkeypatch.setattr(video, "SEQUENTIAL_MAX_FRAMES", 0)  # force the index + seek path
    seeking, mask = read_frames(clip24, 8, segments=4)
    assert mask.all()
    np.testing.assert_array_equal(seeking, sequential)


def test_chunk_major_order(clip24):
    index = sample_indices(16, 8, segments=4)
    np.testing.assert_array_equal(index, [1, 5, 9, 13, 2, 6, 10, 14])  # 1/3 and 2/3 of each segment
    for chunk in index.reshape(2, 4):  # every chunk spans the whole video, one frame per segment
        np.testing.assert_array_equal(chunk // 4, [0, 1, 2, 3])
    frames, _ = read_frames(clip24, 8, segments=2)
    np.testing.assert_array_equal(_frame_numbers(frames), sample_indices(24, 8, segments=2))
    np.testing.assert_array_equal(sample_indices(24, 8, segments=2), [2, 14, 4, 16, 7, 19, 9, 21])


def test_segments_must_divide_num_frames():
    with pytest.raises(ValueError, match=r"num_frames \(8\).*segments \(3\)"):
        sample_indices(24, 8, segments=3)
    with pytest.raises(ValueError, match="mode"):
        sample_indices(24, 8, mode="middle")
    with pytest.raises(ValueError, match="frame sampler 'xpool'"):
        sample_indices(24, 8, sampler="xpool")
    with pytest.raises(ValueError, match=r"'stan'.*segments \(4\) must equal num_frames \(8\)"):
        sample_indices(24, 8, "random", 4, sampler="stan")  # UniformSample trains with one clip


def _slot_draws(n, num_frames, segments, sampler, seeds=300):
    """Every index each output slot took over ``seeds`` random draws."""
    draws = np.stack([sample_indices(n, num_frames, "random", segments, sampler=sampler,
                                     generator=torch.Generator().manual_seed(s)) for s in range(seeds)])
    return [sorted(set(column)) for column in draws.T.tolist()]


# PromptSwitch datasets/video_capture.py, by hand: intervals = int(linspace(0, n, Np + 1)), segment j
# runs from b_j to e_j = b_(j+1) - 1; uniform sample k of c: b_j + (e_j - b_j) // (c + 1) * (k + 1).
@pytest.mark.parametrize("n, num_frames, segments, expected", [
    # b = [0, 2, 5, 8, 10, 13, 16], e - b = [1, 2, 2, 1, 2, 2]; "vtr": [1, 4, 6, 9, 12, 14]
    (16, 6, 6, [0, 3, 6, 8, 11, 14]),
    # the recipe's 12 test frames of a 16-frame clip: (e - b) // 3 = 0, both chunks at b
    (16, 12, 6, [0, 2, 5, 8, 10, 13] * 2),
    # b = [0, 5, 10, ...], e - b = 4: steps of 4 // 3 = 1; "vtr": 5/3, 10/3 -> [1, 6, ..., 3, 8, ...]
    (30, 12, 6, [1, 6, 11, 16, 21, 26, 2, 7, 12, 17, 22, 27]),
    # 8 frames (fewer than 12): b = [0, 1, 2, 4, 5, 6, 8], every step 0
    (8, 12, 6, [0, 1, 2, 4, 5, 6] * 2),
    # 4 frames, fewer than Np: 4 one-frame segments per chunk, then the last frame repeated
    (4, 12, 6, [0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 3, 3]),
])
def test_prompt_switch_sampler_by_hand(n, num_frames, segments, expected):
    assert sample_indices(n, num_frames, "uniform", segments, sampler="prompt_switch").tolist() == expected


def test_prompt_switch_training_draw_never_takes_a_segments_last_frame():
    # random.choice(range(b_j, e_j)): 16 frames, b = [0, 2, 5, 8, 10, 13], e = [1, 4, 7, 9, 12, 15]
    assert _slot_draws(16, 6, 6, "prompt_switch") == [[0], [2, 3], [5, 6], [8], [10, 11], [13, 14]]
    # two chunks draw independently from the same segments
    assert _slot_draws(16, 12, 6, "prompt_switch") == [[0], [2, 3], [5, 6], [8], [10, 11], [13, 14]] * 2
    # one-frame segments (the official range is empty and raises): the segment's frame
    assert _slot_draws(8, 12, 6, "prompt_switch", seeds=50) == [[0], [1], [2], [4], [5], [6]] * 2
    assert _slot_draws(3, 6, 6, "prompt_switch", seeds=20) == [[0], [1], [2], [2], [2], [2]]


# mmaction2 UniformSample as STAN uses it, by hand: s = (n - 1) / T, segment j from round(s j) to
# round(s (j + 1)) (round half to even); test: round(s j) + int(s / 2).
@pytest.mark.parametrize("n, num_frames, segments, expected", [
    # s = 2.5: starts 0, 2 (2.5), 5, 8 (7.5), 10, 12 (12.5); + int(1.25); "vtr": [1, 4, 6, 9, 12, 14]
    (16, 6, None, [1, 3, 6, 9, 11, 13]),
    # s = 23/12: starts 0, 2, 4, 6, 8, 10, 12 (11.5), 13, 15, 17, 19, 21; + int(0.96) = 0
    (24, 12, None, [0, 2, 4, 6, 8, 10, 12, 13, 15, 17, 19, 21]),
    # num_clips = 2 (segments 3): s = 5, duration 5/3: starts 0, 5, 10 + 1, then + 3
    (16, 6, 3, [1, 6, 11, 3, 8, 13]),
    # 5 frames, 12 slots: s = 1/3, starts round(j/3) = 0 0 1 1 1 2 2 2 3 3 3 4, + int(1/6) = 0
    (5, 12, None, [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]),
    (1, 4, None, [0, 0, 0, 0]),
])
def test_stan_sampler_by_hand(n, num_frames, segments, expected):
    assert sample_indices(n, num_frames, "uniform", segments, sampler="stan").tolist() == expected


def test_stan_training_draw_shares_boundary_frames():
    # s = 2.5: ends round(2.5 (j + 1)) = 2, 5, 8, 10, 12, 15; both ends drawn
    assert _slot_draws(16, 6, None, "stan") == [[0, 1, 2], [2, 3, 4, 5], [5, 6, 7, 8], [8, 9, 10], [10, 11, 12],
                                                [12, 13, 14, 15]]
    assert _slot_draws(3, 6, None, "stan", seeds=100) == [[0], [0, 1], [1], [1], [1, 2], [2]]  # s = 1/3


def test_official_samplers_decode_their_indices(clip24, tmp_path):
    frames, mask = read_frames(clip24, 12, segments=6, sampler="prompt_switch")
    assert mask.all()  # b = [0, 4, ..., 20], e - b = 3: steps of 1
    np.testing.assert_array_equal(_frame_numbers(frames), [1, 5, 9, 13, 17, 21, 2, 6, 10, 14, 18, 22])
    short = write_video(tmp_path / "short.mp4", _colour_clip(5))
    frames, mask = read_frames(short, 12, sampler="stan")
    assert mask.all()  # short clips repeat frames, as UniformSample does: no padding
    np.testing.assert_array_equal(_frame_numbers(frames), [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4])


def test_short_video_is_padded_and_masked(tmp_path):
    path = write_video(tmp_path / "short.mp4", _colour_clip(5))
    frames, mask = read_frames(path, 8)
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)
    np.testing.assert_array_equal(_frame_numbers(frames[:5]), range(5))
    assert not frames[5:].any()


def test_random_mode_within_slots_and_reproducible(clip24):
    for segments in (8, 4, 2):
        draws = np.stack([sample_indices(24, 8, "random", segments,
                                         generator=torch.Generator().manual_seed(s)) for s in range(50)])
        per_segment = 8 // segments
        # undo the chunk-major order: slot j (segment-major) must stay in [3j, 3j + 3)
        slots = draws.reshape(50, per_segment, segments).transpose(0, 2, 1).reshape(50, 8)
        assert ((slots // 3) == np.arange(8)).all()
        assert len({tuple(d) for d in draws}) > 1
    first = read_frames(clip24, 8, "random", generator=torch.Generator().manual_seed(3))[0]
    again = read_frames(clip24, 8, "random", generator=torch.Generator().manual_seed(3))[0]
    np.testing.assert_array_equal(first, again)


def _no_video_stream(path):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(b"\x00\x00" * 800)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_video", "no_video_stream"])
def test_bad_input_raises_with_path_and_id(tmp_path, clip24, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = clip24.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_video":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "no_video_stream":
        path = tmp_path / "audio.wav"
        _no_video_stream(path)
    with pytest.raises(VideoDecodeError) as error:
        read_frames(path, 8, video_id=f"id-{kind}")
    assert str(path) in str(error.value) and f"id-{kind}" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_write_video_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_rgb_to_yuv420p_is_exact_bt601_limited_range():
    colours = {(0, 0, 0): (16, 128, 128), (255, 255, 255): (235, 128, 128), (255, 0, 0): (82, 90, 240),
               (0, 255, 0): (144, 54, 34), (0, 0, 255): (41, 240, 110)}  # Y, Cb, Cr; green's Y is 144.55 exactly
    for rgb, yuv in colours.items():
        planes = video.rgb_to_yuv420p(np.full((1, 4, 6, 3), rgb, dtype=np.uint8))
        assert planes.shape == (1, 6, 6) and planes.dtype == np.uint8
        assert (planes[0, :4] == yuv[0]).all()  # Y: 4 x 6
        cb, cr = planes[0, 4:].reshape(-1)[:6], planes[0, 4:].reshape(-1)[6:]  # 2 x 3 each
        assert (cb == yuv[1]).all() and (cr == yuv[2]).all(), rgb
    # chroma is the mean of each 2x2 block: one red pixel in four moves Cr a quarter of the way
    block = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    block[0, 0, 0] = (255, 0, 0)
    assert video.rgb_to_yuv420p(block)[0, 2, 1] == 128 + round((240 - 128) / 4)


def test_rgb_to_yuv420p_ignores_memory_layout():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    expected = video.rgb_to_yuv420p(frames)
    buffer = np.zeros(frames.nbytes + 64, dtype=np.uint8)
    for offset in (1, 3, 17):
        shifted = buffer[offset:offset + frames.nbytes].reshape(frames.shape)
        shifted[:] = frames
        np.testing.assert_array_equal(video.rgb_to_yuv420p(shifted), expected)
    np.testing.assert_array_equal(video.rgb_to_yuv420p(np.asfortranarray(frames)), expected)


def test_decode_threads_share_the_cores_among_the_loaders_workers(monkeypatch):
    from types import SimpleNamespace

    from retrieval.data import video

    monkeypatch.setattr(video.os, "cpu_count", lambda: 2)
    assert video.decode_threads() == 2  # the main process: every core
    for workers, threads in ((1, 2), (2, 1), (3, 1)):  # one worker on two cores takes both
        monkeypatch.setattr(video.torch.utils.data, "get_worker_info", lambda w=workers: SimpleNamespace(num_workers=w))
        assert video.decode_threads() == threads
    monkeypatch.setattr(video.os, "cpu_count", lambda: 16)
    assert video.decode_threads() == video.MAX_DECODE_THREADS  # capped: 3 workers x 4 threads on 16 cores
