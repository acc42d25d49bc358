"""PyAV video decoding and the project's one frame sampler.

``sample_indices`` decides which frames of a clip are kept; ``read_frames`` opens the
file, counts its frames, decodes only the ones the sampler picked and returns them with a
mask that says which output frames are real. ``write_video`` is the matching encoder used
by the synthetic benchmark and the tests.

Decode strategy (reference/framework.md §4.2): a clip whose container reports at most
``SEQUENTIAL_MAX_FRAMES`` frames is decoded sequentially from the start, stopping after the
last needed frame (short clips: the whole clip is cheaper than any seek). Longer clips, and
containers that report no frame count, get a demux-only pass that lists every frame's
timestamp and every keyframe (≈ 17 ms per 900 frames); decoding then seeks to a target
whenever the target lies in a later GOP than the decoder's position and otherwise keeps
decoding forward. That is a sequential pass for long-GOP files and per-target seeking for
short-GOP files, chosen per target rather than per file.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import av
import numpy as np
import torch

SEQUENTIAL_MAX_FRAMES = 512
"""Clips with at most this many frames (by container count) are decoded sequentially."""

MAX_DECODE_THREADS = 4
"""Slice-thread cap outside DataLoader workers (FFmpeg's default, one per CPU, oversubscribes)."""

SAMPLING_MODES = ("uniform", "random")


class VideoDecodeError(ValueError):
    """A video file could not be opened or decoded; the message names the path and the id."""


def sample_indices(
    num_available: int,
    num_frames: int,
    mode: str = "uniform",
    segments: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Picks which frames of a clip to decode: the one frame sampler of the project.

    The clip is split into ``segments`` equal segments, each contributing
    ``num_frames // segments`` samples. The output is chunk-major: chunk ``c`` holds the
    ``c``-th sample of every segment, so each run of ``segments`` consecutive outputs spans
    the whole clip (Prompt Switch's sampler). With ``segments == num_frames`` (the default)
    this is the usual one-frame-per-segment sampler.

    Args:
        num_available: Number of frames in the clip.
        num_frames: Number of output frames ``T``.
        mode: ``"uniform"``: sample ``k`` of ``c`` per segment sits at
            ``start + length * (k + 1) / (c + 1)`` (``c = 1``: the segment's middle).
            ``"random"``: a uniformly random frame in each (segment, sub-slot) region.
        segments: Number of segments; must divide ``num_frames``. None means ``num_frames``.
        generator: Random source for ``mode="random"``. None uses torch's global generator,
            which DataLoader seeds differently in every worker.

    Returns:
        int64 frame indices of length ``min(num_frames, num_available)``. A clip shorter than
        ``num_frames`` yields all its frames in order (the caller pads and masks the rest).

    Raises:
        ValueError: On an unknown mode, a non-positive count, or ``segments`` that does not
            divide ``num_frames``.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    segments = num_frames if segments is None else segments
    if num_frames < 1 or segments < 1:
        raise ValueError(f"num_frames ({num_frames}) and segments ({segments}) must be positive")
    if num_frames % segments:
        raise ValueError(
            f"num_frames ({num_frames}) must be a multiple of segments ({segments})"
        )
    if num_available < num_frames:
        return np.arange(num_available, dtype=np.int64)
    per_segment = num_frames // segments
    if mode == "uniform":
        seg = np.arange(segments)[:, None]
        k = np.arange(per_segment)[None, :]
        length = num_available / segments
        position = seg * length + length * (k + 1) / (per_segment + 1)  # [segments, per_segment]
        index = np.floor(position).astype(np.int64)
    else:
        # Sub-slot j of the segment-major order covers [n*j/T, n*(j+1)/T): at least one frame.
        bounds = (np.arange(num_frames + 1) * num_available) // num_frames
        low = torch.from_numpy(bounds[:-1])
        width = torch.from_numpy(bounds[1:] - bounds[:-1])
        offset = (torch.rand(num_frames, generator=generator, dtype=torch.float64) * width).long()
        index = (low + torch.minimum(offset, width - 1)).numpy().reshape(segments, per_segment)
    return np.ascontiguousarray(index.T).reshape(-1)  # chunk-major


def read_frames(
    path: str | os.PathLike,
    num_frames: int | None,
    mode: str = "uniform",
    segments: int | None = None,
    *,
    video_id: str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``num_frames`` sampled frames of a video with PyAV.

    One container per call, slice threading only, one decode thread inside DataLoader
    workers (the workers provide the parallelism; see framework.md §4.1).

    Args:
        path: Video file.
        num_frames: Number of output frames ``T``; ``None`` decodes every frame of the video
            (what ``VideoTextDataModule(cache_frames=True)`` keeps in memory).
        mode: ``"uniform"`` or ``"random"`` (see ``sample_indices``).
        segments: Segments of the sampler (see ``sample_indices``).
        video_id: Dataset id, quoted in error messages. Defaults to the file stem.
        generator: Random source for ``mode="random"``.

    Returns:
        ``(frames, mask)``: uint8 RGB frames ``[T, H, W, 3]`` and a bool mask ``[T]``. A clip
        with ``n < T`` frames gives its ``n`` frames in order followed by ``T - n`` zero frames
        whose mask is False.

    Raises:
        VideoDecodeError: The file is missing or empty, is not a video, has no video stream,
            or yields no decodable frame.
        ValueError: On invalid sampler arguments.
    """
    path = Path(path)
    video_id = path.stem if video_id is None else video_id

    def fail(reason: str) -> VideoDecodeError:
        return VideoDecodeError(f"video {video_id!r} ({path}): {reason}")

    if not path.is_file():
        raise fail("file not found")
    if path.stat().st_size == 0:
        raise fail("file is empty (0 bytes)")
    if num_frames is not None:
        sample_indices(num_frames, num_frames, mode, segments)  # argument errors stay ValueErrors

    def pick(available: int) -> np.ndarray:
        if num_frames is None:
            return np.arange(available)
        return sample_indices(available, num_frames, mode, segments, generator=generator)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            in_worker = torch.utils.data.get_worker_info() is not None
            stream.thread_count = 1 if in_worker else min(MAX_DECODE_THREADS, os.cpu_count() or 1)
            count = stream.frames
            if 0 < count <= SEQUENTIAL_MAX_FRAMES:
                index = pick(count)
                frames = _decode_sequential(container, stream, index, count, fail)
            else:
                frame_pts, keyframe_pts = _scan_timestamps(container, stream)
                if not frame_pts:
                    raise fail("the container holds no video packets")
                index = pick(len(frame_pts))
                frames = _decode_seeking(container, stream, index, frame_pts, keyframe_pts, fail)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as error:
        raise fail(f"cannot decode: {error}") from error
    return pad_frames(np.stack(frames), len(frames) if num_frames is None else num_frames)


def pad_frames(frames: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``[n, H, W, 3]`` frames to ``num_frames`` (n <= num_frames); the mask marks the real ones."""
    mask = np.zeros(num_frames, dtype=bool)
    mask[: len(frames)] = True
    out = np.zeros((num_frames, *frames.shape[1:]), dtype=np.uint8)
    out[: len(frames)] = frames
    return out, mask


def _decode_sequential(container, stream, index: np.ndarray, count: int, fail) -> list[np.ndarray]:
    """Decodes from the start and stops after the last frame in ``index``."""
    slots: dict[int, list[int]] = {}
    for slot, frame_index in enumerate(index.tolist()):
        slots.setdefault(frame_index, []).append(slot)
    last = int(index.max())
    out: list[np.ndarray | None] = [None] * len(index)
    decoded = 0
    for decoded, frame in enumerate(container.decode(stream), start=1):
        for slot in slots.get(decoded - 1, ()):
            out[slot] = frame.to_ndarray(format="rgb24")
        if decoded - 1 >= last:
            break
    if decoded == 0:
        raise fail("decoding yielded no frames")
    if decoded - 1 < last:
        raise fail(f"the container reports {count} frames but decoding stopped after {decoded}")
    return out


def _scan_timestamps(container, stream) -> tuple[list[int], list[int]]:
    """Demux-only pass: sorted presentation timestamps of all frames and of the keyframes."""
    frame_pts: list[int] = []
    keyframe_pts: list[int] = []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        frame_pts.append(packet.pts)
        if packet.is_keyframe:
            keyframe_pts.append(packet.pts)
    frame_pts.sort()
    keyframe_pts.sort()
    return frame_pts, keyframe_pts


def _decode_seeking(
    container, stream, index: np.ndarray, frame_pts: list[int], keyframe_pts: list[int], fail
) -> list[np.ndarray]:
    """Decodes the frames at ``index``, seeking only when a target lies in a later GOP."""
    out: list[np.ndarray | None] = [None] * len(index)
    decoder = None
    last = None  # the last decoded frame
    image = None
    for slot in np.argsort(index, kind="stable").tolist():
        target = frame_pts[int(index[slot])]
        if last is not None and last.pts == target:  # the sampler picked this frame twice
            out[slot] = image
            continue
        key = keyframe_pts[max(bisect.bisect_right(keyframe_pts, target) - 1, 0)] if keyframe_pts else 0
        if decoder is None or (last is not None and key > last.pts):
            container.seek(key, stream=stream, backward=True)
            decoder = container.decode(stream)
        last = next((f for f in decoder if f.pts is not None and f.pts >= target), None)
        if last is None:
            raise fail(f"decoding stopped before frame {int(index[slot])} (pts {target})")
        image = last.to_ndarray(format="rgb24")
        out[slot] = image
    return out


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "libx264",
    *,
    options: dict[str, str] | None = None,
) -> Path:
    """Encodes uint8 RGB frames ``[T, H, W, 3]`` into a yuv420p video file with PyAV.

    Args:
        path: Output file; its suffix picks the container (``.mp4``).
        frames: uint8 array ``[T, H, W, 3]`` with even ``H`` and ``W`` (yuv420p needs them).
        fps: Frame rate.
        codec: FFmpeg encoder name (``libx264``, ``mpeg4``).
        options: Encoder options, e.g. ``{"crf": "18"}``.

    Returns:
        The path written.

    Raises:
        ValueError: If the array is not uint8 ``[T, H, W, 3]`` with ``T >= 1`` and even sizes.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            f"frames must be a non-empty uint8 array [T, H, W, 3]; got {frames.dtype} {frames.shape}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes; got {width}x{height} for {path}")
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(options or {})
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path
