"""PyAV video decoding and the project's one frame sampler.

``sample_indices`` decides which frames of a clip are kept; ``read_frames`` opens the
file, counts its frames, decodes only the ones the sampler picked and returns them with a
mask that says which output frames are real. ``write_video`` is the matching encoder used
by the synthetic benchmark and the tests; it converts RGB to yuv420p itself
(``rgb_to_yuv420p``, exact integer arithmetic), so no FFmpeg colour conversion, whose SIMD
paths differ between CPUs, sits between the frames and the encoder.

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
"""Slice-thread cap per decoder (FFmpeg's default, one per CPU, oversubscribes)."""

SAMPLING_MODES = ("uniform", "random")

FRAME_SAMPLERS = ("vtr", "prompt_switch", "stan")
"""Where ``sample_indices`` puts a clip's segments and the frames in them (see its docstring)."""


class VideoDecodeError(ValueError):
    """A video file could not be opened or decoded; the message names the path and the id."""


def sample_indices(
    num_available: int,
    num_frames: int,
    mode: str = "uniform",
    segments: int | None = None,
    *,
    sampler: str = "vtr",
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Picks which frames of a clip to decode: the one frame sampler of the project.

    The clip is split into ``segments`` segments, each contributing ``c = num_frames // segments``
    samples. The output is chunk-major: chunk ``k`` holds the ``k``-th sample of every segment, so
    each run of ``segments`` consecutive outputs spans the whole clip (Prompt Switch's sampler).
    With ``segments == num_frames`` (the default) this is the usual one-frame-per-segment sampler.
    ``mode`` ``"uniform"`` is the deterministic (evaluation) placement, ``"random"`` the training
    draw. ``sampler`` picks the formulas, for a clip of ``n`` frames and S segments:

    - ``"vtr"``: real-valued bounds, segment j is ``[j n / S, (j + 1) n / S)``. Uniform: sample
      k sits at ``start + length (k + 1) / (c + 1)``, floored (c = 1: the segment's middle).
      Random: a uniformly random frame in each of the T equal (segment, sample) slots. A clip
      with ``n < num_frames`` yields each of its frames once (the caller pads and masks the rest).
    - ``"prompt_switch"``: the official ``VideoCapture.load_frames_from_video``
      (bladewaltz1/PromptSwitch ``datasets/video_capture.py``): ``min(S, n)`` segments with
      integer bounds ``b = int(linspace(0, n, S + 1))``, segment j ending at ``e_j = b_{j+1} - 1``.
      Uniform: ``b_j + (e_j - b_j) // (c + 1) * (k + 1)`` (the floored step puts frames up to 2
      earlier than ``"vtr"``). Random: each sample uniform on ``b_j .. e_j - 1`` (the official
      ``random.choice(range(b_j, e_j))`` never draws a segment's last frame). A clip with
      ``n < S`` has n one-frame segments and, as the official loader repeats its last frame,
      the last index is repeated up to ``num_frames``. On purpose: where the official random
      draw meets a one-frame segment (an empty range: it raises) this takes that frame.
    - ``"stan"``: mmaction2's ``UniformSample`` as STAN uses it (farewellthree/STAN
      ``mmaction/datasets/transforms/loading.py``): ``s = (n - 1) / S``, segment j from
      ``round(s j)`` to ``round(s (j + 1))`` (numpy's round-half-to-even), both ends included, so
      neighbouring segments share their boundary frame. Uniform (``test_mode``, ``num_clips = c``):
      ``round(s j) + int(s / (c + 1) * (k + 1))``. Random: a uniform frame of the segment, ends
      included; one per segment (``UniformSample`` trains with one clip), so ``segments`` must be
      ``num_frames``. Every ``n >= 1`` gives ``num_frames`` indices (short clips repeat frames).

    Args:
        num_available: Number of frames in the clip.
        num_frames: Number of output frames ``T``.
        mode: ``"uniform"`` or ``"random"``.
        segments: Number of segments; must divide ``num_frames``. None means ``num_frames``.
        sampler: ``"vtr"``, ``"prompt_switch"`` or ``"stan"``.
        generator: Random source for ``mode="random"``. None uses torch's global generator,
            which DataLoader seeds differently in every worker.

    Returns:
        int64 frame indices: ``min(num_frames, num_available)`` of them with ``"vtr"``,
        ``num_frames`` with the official samplers.

    Raises:
        ValueError: On an unknown mode or sampler, a non-positive count, ``segments`` that does
            not divide ``num_frames``, or ``"stan"`` drawing at random more than one frame per
            segment.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    if sampler not in FRAME_SAMPLERS:
        raise ValueError(f"unknown frame sampler {sampler!r}; expected one of {FRAME_SAMPLERS}")
    segments = num_frames if segments is None else segments
    if num_available < 1 or num_frames < 1 or segments < 1:
        raise ValueError(
            f"num_available ({num_available}), num_frames ({num_frames}) and segments ({segments}) must be positive"
        )
    if num_frames % segments:
        raise ValueError(
            f"num_frames ({num_frames}) must be a multiple of segments ({segments})"
        )
    per_segment = num_frames // segments
    random = mode == "random"
    if sampler == "vtr":
        if num_available < num_frames:
            return np.arange(num_available, dtype=np.int64)
        index = _vtr_segments(num_available, segments, per_segment, random, generator)
    elif sampler == "prompt_switch":
        index = _prompt_switch_segments(num_available, segments, per_segment, random, generator)
    else:
        index = _stan_segments(num_available, segments, per_segment, random, generator)
    index = np.ascontiguousarray(index.T).reshape(-1)  # [segments, per_segment] -> chunk-major
    return np.concatenate([index, np.full(num_frames - len(index), index[-1], dtype=np.int64)])


def _uniform_draw(low: np.ndarray, width: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
    """One uniformly random integer in ``[low, low + width)`` per element (``width >= 1``)."""
    offset = np.floor(torch.rand(low.shape, generator=generator, dtype=torch.float64).numpy() * width)
    return low + np.minimum(offset.astype(np.int64), width - 1)


def _vtr_segments(n: int, segments: int, per_segment: int, random: bool, generator) -> np.ndarray:
    """``"vtr"``: ``[segments, per_segment]`` indices (``n >= num_frames``)."""
    if random:
        # sub-slot j of the segment-major order covers [n*j/T, n*(j+1)/T): at least one frame
        bounds = (np.arange(segments * per_segment + 1) * n) // (segments * per_segment)
        index = _uniform_draw(bounds[:-1], bounds[1:] - bounds[:-1], generator)
        return index.reshape(segments, per_segment)
    seg = np.arange(segments)[:, None]
    k = np.arange(per_segment)[None, :]
    length = n / segments
    return np.floor(seg * length + length * (k + 1) / (per_segment + 1)).astype(np.int64)


def _prompt_switch_segments(n: int, segments: int, per_segment: int, random: bool, generator) -> np.ndarray:
    """``"prompt_switch"``: ``[min(segments, n), per_segment]`` indices."""
    bounds = np.linspace(0, n, min(segments, n) + 1).astype(np.int64)  # the official ``intervals``
    start, end = bounds[:-1, None], bounds[1:, None] - 1  # the official ``ranges``
    if random:
        shape = (len(start), per_segment)
        width = np.broadcast_to(np.maximum(end - start, 1), shape)  # a one-frame segment: its frame
        return _uniform_draw(np.broadcast_to(start, shape), width, generator)
    return start + (end - start) // (per_segment + 1) * np.arange(1, per_segment + 1)[None, :]


def _stan_segments(n: int, segments: int, per_segment: int, random: bool, generator) -> np.ndarray:
    """``"stan"``: ``[segments, per_segment]`` indices."""
    size = float(n - 1) / segments  # ``seg_size``
    j = np.arange(segments)[:, None]
    start = np.round(size * j).astype(np.int64)
    if not random:
        return start + (size / (per_segment + 1) * np.arange(1, per_segment + 1)[None, :]).astype(np.int64)
    if per_segment != 1:
        raise ValueError(
            f"frame sampler 'stan' draws one random frame per segment (UniformSample trains with one clip): "
            f"segments ({segments}) must equal num_frames ({segments * per_segment}) in random mode"
        )
    end = np.round(size * (j + 1)).astype(np.int64)
    return _uniform_draw(start, end - start + 1, generator)


def decode_threads() -> int:
    """FFmpeg slice threads for one decoder: the cores shared among the DataLoader's workers
    (one each when there are as many workers as cores), at most ``MAX_DECODE_THREADS``.

    Slice threads speed up even these single-slice H.264 clips: on this project's 2-core CPU
    one thread decoded a clip of the loader benchmark in 49-50 ms, two in 37-38 ms, so a
    single worker on two cores needs both."""
    cores = os.cpu_count() or 1
    worker = torch.utils.data.get_worker_info()
    share = cores // worker.num_workers if worker is not None else cores
    return max(1, min(MAX_DECODE_THREADS, share))


def read_frames(
    path: str | os.PathLike,
    num_frames: int | None,
    mode: str = "uniform",
    segments: int | None = None,
    *,
    sampler: str = "vtr",
    video_id: str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``num_frames`` sampled frames of a video with PyAV.

    One container per call, slice threading only, the cores shared among DataLoader workers
    (:func:`decode_threads`; the workers provide the parallelism, framework.md §4.1).

    Args:
        path: Video file.
        num_frames: Number of output frames ``T``; ``None`` decodes every frame of the video
            (what ``VideoTextDataModule(cache_frames=True)`` keeps in memory).
        mode: ``"uniform"`` or ``"random"`` (see ``sample_indices``).
        segments: Segments of the sampler (see ``sample_indices``).
        sampler: ``"vtr"``, ``"prompt_switch"`` or ``"stan"`` (see ``sample_indices``).
        video_id: Dataset id, quoted in error messages. Defaults to the file stem.
        generator: Random source for ``mode="random"``.

    Returns:
        ``(frames, mask)``: uint8 RGB frames ``[T, H, W, 3]`` and a bool mask ``[T]``. With the
        ``"vtr"`` sampler a clip with ``n < T`` frames gives its ``n`` frames in order followed
        by ``T - n`` zero frames whose mask is False (the official samplers repeat frames).

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
        sample_indices(num_frames, num_frames, mode, segments, sampler=sampler)  # argument errors stay ValueErrors

    def pick(available: int) -> np.ndarray:
        if num_frames is None:
            return np.arange(available)
        return sample_indices(available, num_frames, mode, segments, sampler=sampler, generator=generator)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            stream.thread_count = decode_threads()
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
    """Zero-pad ``[n, H, W, 3]`` frames to ``num_frames`` (n <= num_frames); the mask marks the real ones.
    With nothing to pad the frames are returned as they are (no copy)."""
    mask = np.zeros(num_frames, dtype=bool)
    mask[: len(frames)] = True
    if len(frames) == num_frames:
        return frames, mask
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


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB to planar YUV 4:2:0 in exact integer arithmetic: the same bytes on every machine.

    BT.601 limited range (what FFmpeg assumes for an untagged yuv420p stream, so decoders
    convert back with the matching matrix), 8-bit fixed-point coefficients rounded half up::

        Y  = ((  66 R + 129 G +  25 B + 128) >> 8) +  16
        Cb = (( -38 R -  74 G + 112 B + 128) >> 8) + 128
        Cr = (( 112 R -  94 G -  18 B + 128) >> 8) + 128

    Chroma is taken from the sum of each 2x2 block (the ``+ 128 >> 8`` becoming ``+ 512 >> 10``),
    i.e. the block's mean, sited at its centre.

    Args:
        frames: uint8 ``[T, H, W, 3]`` with even ``H`` and ``W``.

    Returns:
        uint8 ``[T, H * 3 // 2, W]``: per frame the Y plane, then U and V (each ``H/2 x W/2``,
        flattened row-major), the layout ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes.
    """
    count, height, width = frames.shape[:3]
    rgb = frames.astype(np.int32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = ((66 * red + 129 * green + 25 * blue + 128) >> 8) + 16

    def block_sum(channel: np.ndarray) -> np.ndarray:
        return channel.reshape(count, height // 2, 2, width // 2, 2).sum(axis=(2, 4))

    red, green, blue = block_sum(red), block_sum(green), block_sum(blue)
    cb = ((-38 * red - 74 * green + 112 * blue + 512) >> 10) + 128
    cr = ((112 * red - 94 * green - 18 * blue + 512) >> 10) + 128
    planes = [plane.reshape(count, -1) for plane in (luma, cb, cr)]
    return np.concatenate(planes, axis=1).astype(np.uint8).reshape(count, height * 3 // 2, width)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "libx264",
    *,
    options: dict[str, str] | None = None,
) -> Path:
    """Encodes uint8 RGB frames ``[T, H, W, 3]`` into a yuv420p video file with PyAV.

    The frames are converted to yuv420p by ``rgb_to_yuv420p`` and handed to the encoder as
    such (FFmpeg's swscale converts nothing). Whether the output bytes are reproducible is up
    to the encoder and its ``options``: see ``retrieval.data.synthetic.ENCODER_OPTIONS`` for
    libx264 settings that make them so.

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
        for image in rgb_to_yuv420p(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="yuv420p")))
        container.mux(stream.encode())
    return path
