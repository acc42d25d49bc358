"""Probe every video once before training: a bad file fails setup, not the first validation.

``probe_video`` checks what decoding will need, cheaply: the container opens, holds a video
stream and video packets; the file holds every frame its container lists (mp4 / avi
indexes) or, where the container lists none (webm / mkv), lasts as long as its header says;
and the last GOP decodes up to the last frame. Truncation, the common way a download or a
copy goes wrong, loses the tail, which the sampled frames of one training step rarely touch.

The cost is one demux-only pass over the file (no decoding) plus decoding one GOP.
``probe_videos`` runs it in a thread pool with a progress bar and keeps every result in a
small JSON file keyed by path, size and modification time, so a second setup on unchanged
files opens none of them (a changed file is probed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

import av
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from retrieval.data.formats import VIDEO_EXTENSIONS, VideoRecord, resolve_video_path
from retrieval.data.video import VideoDecodeError

log = logging.getLogger(__name__)

BAD_VIDEO_POLICIES = ("error", "skip")
LISTED_REASONS = 20
"""A failed check names every bad id, and the reason of the first this many."""

PROBE_VERSION = 1
"""Stored in each cache file; results of another version are probed again."""

MIN_MISSING_SECONDS = 0.5
"""Where only a duration can tell truncation (no frame count), the video must fall short of
the container's duration by more than this and by more than ``MISSING_FRACTION`` of it: an
audio track may outlast the video by a little."""
MISSING_FRACTION = 0.05


@dataclass(frozen=True)
class VideoProbe:
    """What the probe found in one file.

    Attributes:
        frames: Video packets (frames) in the file; 0 when it does not open.
        seconds: Duration of the video stream, from its first to the end of its last frame.
        error: Why the video cannot be used, or None.
    """

    frames: int
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Checks that a video opens, holds all the frames it lists and decodes to its last frame."""
    path = Path(path)
    if not path.is_file():
        return VideoProbe(0, 0.0, "file not found")
    if path.stat().st_size == 0:
        return VideoProbe(0, 0.0, "file is empty (0 bytes)")
    try:
        with av.open(str(path)) as container:
            return _probe(container)
    except (av.FFmpegError, OSError, ValueError, EOFError) as error:
        return VideoProbe(0, 0.0, f"cannot open or decode: {error}")


def _probe(container) -> VideoProbe:
    if not container.streams.video:  # also what an mp4 cut before its index (moov atom) at the end gives
        kinds = ", ".join(stream.type for stream in container.streams) or "none"
        return VideoProbe(0, 0.0, f"no video stream (streams: {kinds}): not a video, or a truncated one")
    stream = container.streams.video[0]
    stream.thread_type, stream.thread_count = "SLICE", 1
    packet_pts, keyframe_pts, end = [], [], None
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:  # the demuxer's final flush packet
            continue
        packet_pts.append(packet.pts)
        if packet.is_keyframe:
            keyframe_pts.append(packet.pts)
        stop = packet.pts + (packet.duration or 0)
        end = stop if end is None else max(end, stop)
    if not packet_pts:
        return VideoProbe(0, 0.0, "the container holds no video packets")
    start = stream.start_time if stream.start_time is not None else min(packet_pts)

    def at(pts: int) -> str:
        return f"{float((pts - start) * stream.time_base):.2f} s"

    seconds = float((end - start) * stream.time_base)
    found = VideoProbe(len(packet_pts), seconds)
    listed = stream.frames
    if listed and len(packet_pts) < listed:
        return _bad(found, f"truncated: the container lists {listed} frames but the file holds {len(packet_pts)}")
    header = container.duration / av.time_base if container.duration else 0.0
    missing = header - seconds
    if not listed and missing > max(MIN_MISSING_SECONDS, MISSING_FRACTION * header):
        return _bad(found, f"truncated: the container lasts {header:.2f} s but its video stops at {seconds:.2f} s")
    last = max(packet_pts)
    key = max((k for k in keyframe_pts if k <= last), default=min(packet_pts))
    try:
        container.seek(key, stream=stream, backward=True)
        decoded = max((f.pts for f in container.decode(stream) if f.pts is not None), default=None)
    except (av.FFmpegError, EOFError) as error:
        return _bad(found, f"the last frames do not decode (from {at(key)} to {at(last)}): {error}")
    if decoded is None or decoded < last:
        stopped = "gives no frame" if decoded is None else f"stops at {at(decoded)}"
        return _bad(found, f"the last frames do not decode: decoding from {at(key)} {stopped}, "
                           f"the last frame is at {at(last)}")
    return found


def _bad(found: VideoProbe, reason: str) -> VideoProbe:
    return VideoProbe(found.frames, found.seconds, reason)


def cache_file(videos_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The probe cache of one videos folder: ``cache_dir/video_probe/<folder name>-<hash>.json``."""
    folder = Path(videos_dir).resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return Path(cache_dir) / "video_probe" / f"{folder.name}-{digest}.json"


def probe_videos(
    paths: Sequence[str | os.PathLike],
    cache: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    desc: str = "probing videos",
    progress: bool = True,
) -> list[VideoProbe]:
    """Probes many videos in a thread pool, reusing the cached result of every unchanged file.

    Args:
        paths: Video files.
        cache: JSON file of earlier results (created if missing; None: no cache). An entry
            is reused while the file keeps its size and modification time.
        workers: Threads (default ``min(8, cpus)``).
        desc: Progress bar label (the bar counts the files actually probed).
        progress: Show the progress bar.

    Returns:
        One ``VideoProbe`` per path, in order.
    """
    entries = _load(Path(cache)) if cache else {}
    keys, results, todo = [], [], []
    for i, path in enumerate(paths):
        key = os.path.abspath(path)  # not resolve(): its symlink walk costs more than the probe's cache hit
        try:
            stat = os.stat(key)
        except OSError:
            keys.append(None)
            results.append(VideoProbe(0, 0.0, "file not found"))
            continue
        keys.append((key, stat.st_size, stat.st_mtime_ns))
        entry = entries.get(key)
        if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            results.append(VideoProbe(*entry[2:]))
        else:
            results.append(None)
            todo.append(i)
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(todo), desc=desc, unit="video", disable=not progress)
        with ThreadPoolExecutor(max_workers=workers) as pool, bar:
            for i, probe in zip(todo, pool.map(probe_video, [paths[i] for i in todo])):
                results[i] = probe
                bar.update()
        if cache:
            fresh = {keys[i][0]: [*keys[i][1:], *astuple(results[i])] for i in todo}
            _save(Path(cache), fresh)
    return results


def _load(path: Path) -> dict[str, list]:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("ignoring the unreadable video probe cache %s: %s", path, error)
        return {}
    return payload.get("videos", {}) if payload.get("version") == PROBE_VERSION else {}


def _save(path: Path, fresh: dict[str, list]) -> None:
    """Merges ``fresh`` into the file (re-read first: other processes may have added entries)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_load(path), **fresh}
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps({"version": PROBE_VERSION, "videos": entries}))
        os.replace(partial, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as error:
        log.warning("cannot write the video probe cache %s (the next setup probes again): %s", path, error)


def probe_splits(
    splits: dict[str, list[VideoRecord]], videos_dir: str | os.PathLike, cache: str | os.PathLike | None,
    *, progress: bool = True, dataset: str | None = None,
) -> dict[str, list[tuple[VideoRecord, VideoProbe]]]:
    """Finds and probes the video of every record of every split (one pool, one progress bar).

    ``dataset`` names the format whose file names an id may have (DiDeMo keeps its whole id);
    None tries every format's.

    Returns:
        Per split, each record (its ``path`` resolved under ``videos_dir``; a missing file
        keeps None) with its probe.
    """
    located = {
        split: [VideoRecord(r.video_id, resolve_video_path(videos_dir, r.video_id, dataset), r.captions, r.split)
                for r in records]
        for split, records in splits.items()
    }
    found = [r for records in located.values() for r in records if r.path is not None]
    results = iter(probe_videos([r.path for r in found], cache, progress=progress,
                                desc=f"probing {'/'.join(splits)} videos"))
    missing = VideoProbe(0, 0.0, f"file not found (tried {', '.join(VIDEO_EXTENSIONS)})")
    return {
        split: [(r, next(results) if r.path is not None else missing) for r in records]
        for split, records in located.items()
    }


def apply_policy(probed: dict[str, list[tuple[VideoRecord, VideoProbe]]], policy: str,
                 videos_dir: str | os.PathLike) -> dict[str, list[VideoRecord]]:
    """What ``on_bad_video`` does with the probe results.

    Args:
        probed: Output of ``probe_splits``.
        policy: ``error``: raise if any video of any split is bad; ``skip``: drop the bad
            ones, logging each id and the total per split.
        videos_dir: The videos folder, quoted in the messages.

    Returns:
        Per split, the usable records, in order.

    Raises:
        VideoDecodeError: ``error`` and some videos are bad (the message lists every bad id
            with its split), or ``skip`` and a split has no usable video left.
    """
    def where(record: VideoRecord) -> str:
        return str(record.path or Path(videos_dir) / f"{record.video_id}.*")

    bad = [(split, record, probe) for split, pairs in probed.items() for record, probe in pairs if not probe.ok]
    if bad and policy == "error":
        ids = ", ".join(f"{record.video_id} ({split})" for split, record, _ in bad)
        reasons = "\n".join(f"  {record.video_id} ({split}, {where(record)}): {probe.error}"
                             for split, record, probe in bad[:LISTED_REASONS])
        more = f"\n  ... and {len(bad) - LISTED_REASONS} more" if len(bad) > LISTED_REASONS else ""
        raise VideoDecodeError(
            f"{len(bad)} unusable video{'s' * (len(bad) > 1)} in {videos_dir}: {ids}\n{reasons}{more}\n"
            "Replace or remove them, or set data.on_bad_video=skip to train without them."
        )
    kept = {}
    for split, pairs in probed.items():
        for record, probe in pairs:
            if not probe.ok:
                _warn(f"on_bad_video='skip': skipping {split} video {record.video_id!r} ({where(record)}): "
                      f"{probe.error}")
        kept[split] = [record for record, probe in pairs if probe.ok]
        if len(kept[split]) < len(pairs):
            _warn(f"on_bad_video='skip': skipped {len(pairs) - len(kept[split])} of {len(pairs)} {split} videos")
        if not kept[split]:
            raise VideoDecodeError(f"no usable video in the {split} split of {videos_dir}")
    return kept


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
