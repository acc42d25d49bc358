"""``vtr bench loader``: the DataModule's video loader against raw PyAV decoding of the same frames.

For each worker count, clips/s of

- ``raw``: plain PyAV, no vtr code: open the file, decode forward to the last sampled frame,
  convert the sampled frames (the same ``sample_indices`` over the container's frame count) to
  RGB arrays; with workers, the same function mapped over a warm process pool;
- ``loader``: ``VideoTextDataModule``'s evaluation videos loader (decode, sample, resize and
  crop to the backbone's size in uint8, batching; the normalisation to float runs where the
  batch lands, ``normalize_frames``), iterated over the same clips;
- ``loader_cached``: the same loader with ``cache_frames`` on, second pass (frames from memory);
- ``raw_prepared`` / ``loader_prepared``: both again on the ``vtr prepare``d copies (3 fps,
  short side 224) of the clips.

The modes take turns within each of ``--repeats`` passes (medians reported), so a change in the
machine's other load falls on all of them alike. ``ratio`` = loader clips/s over raw clips/s at
the same worker count (target >= 0.9). By
default the clips are generated once under ``$VTR_CACHE/bench-loader`` (MSR-VTT layout,
``--num-videos`` clips of ``--seconds`` s at 30 fps, 320x240); ``--annotations-dir`` /
``--videos-dir`` point it at a real MSR-VTT-layout test split instead. Results go to
``<out>/loader_<device>_..._torch<v>_vtr<v>.csv`` (``--out`` default ``runs/bench``; pass
``--out experiments/results`` to write the committed table).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
import torch

from retrieval.bench.results import other_load, result_filename
from retrieval.data.datamodule import VideoTextDataModule, default_cache_dir
from retrieval.data.video import sample_indices, write_video
from retrieval.tools.prepare import prepare_folder

COLUMNS = ("source", "mode", "workers", "num_videos", "num_frames", "batch_size", "clips_per_s", "ratio", "host_load",
           "pyav", "python")


def raw_decode(path: str, num_frames: int) -> np.ndarray:
    """The sampled frames of a clip with plain PyAV: ``[num_frames, H, W, 3]`` uint8."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        if not stream.frames:
            raise ValueError(f"{path}: the container reports no frame count (the raw baseline needs one)")
        wanted = sample_indices(stream.frames, num_frames, "uniform").tolist()
        kept: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    return np.stack([kept[i] for i in wanted])


def generate_clips(root: Path, num_videos: int, seconds: int, fps: int = 30, size=(240, 320)) -> Path:
    """``num_videos`` moving-gradient clips and a JSFusion test csv in MSR-VTT layout (kept if present)."""
    videos = root / "videos"
    csv_path = root / "MSRVTT_JSFUSION_test.csv"
    if csv_path.is_file() and len(list(videos.glob("*.mp4"))) == num_videos:
        return root
    videos.mkdir(parents=True, exist_ok=True)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rows = []
    for i in range(num_videos):
        t = np.arange(seconds * fps)[:, None, None]
        frames = np.stack([(x[None] + 3 * t + 40 * i) % 256, (y[None] + 2 * t) % 256,
                           (x[None] + y[None] + t * (i + 1)) % 256], axis=-1).astype(np.uint8)
        write_video(videos / f"video{i}.mp4", frames, fps=fps)
        rows.append({"key": f"ret{i}", "vid_key": f"msr{i}", "video_id": f"video{i}", "sentence": f"clip {i}"})
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def raw_pass(paths: list[str], num_frames: int, pool: ProcessPoolExecutor | None, workers: int = 0):
    """One pass of ``raw_decode`` over ``paths``: inline, or mapped over a warm pool of ``workers``."""
    if pool is None:
        return lambda: [raw_decode(p, num_frames) for p in paths]
    list(pool.map(raw_decode, paths[:workers], [num_frames] * workers))  # start the workers
    return lambda: list(pool.map(raw_decode, paths, [num_frames] * len(paths)))


def loader_pass(annotations_dir: Path, videos_dir: Path, num_frames: int, workers: int, cache: bool,
                batch_size: int = 2):
    """One pass of the DataModule's test videos loader (with ``cache``: after the filling pass).

    A DataLoader worker produces whole batches, so ``batch_size`` must leave several batches per
    worker (:func:`run` checks): 8 clips in one batch of 8 keep one of two workers idle."""
    data = VideoTextDataModule(dataset="msrvtt", annotations_dir=str(annotations_dir), videos_dir=str(videos_dir),
                               backbone="ViT-B-32", num_frames=num_frames, eval_batch_size=batch_size,
                               num_workers=workers, cache_frames=cache)
    data.setup("test")
    loader = data.test_dataloader()[0]
    if cache or workers:
        for _ in loader:  # fills the cache / starts the persistent workers
            pass
    return lambda: [None for _ in loader]


def time_interleaved(passes: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds per pass of each mode, the modes taking turns within every repeat, so a
    change in the machine's other load falls on all of them alike."""
    times: dict[str, list[float]] = {mode: [] for mode in passes}
    for _ in range(repeats):
        for mode, one_pass in passes.items():
            start = time.perf_counter()
            one_pass()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(seconds) for mode, seconds in times.items()}


def run(annotations_dir: Path, videos_dir: Path, prepared_dir: Path | None, workers: list[int], num_frames: int,
        repeats: int, batch_size: int = 2) -> list[dict]:
    """Every (source, mode, workers) row.

    Raises:
        ValueError: fewer than 4 loader batches per worker (the loader would be timed idle).
    """
    ids = [row["video_id"] for row in csv.DictReader(open(annotations_dir / "MSRVTT_JSFUSION_test.csv"))]
    batches = -(-len(ids) // batch_size)
    if batches < 4 * max(workers + [1]):
        raise ValueError(f"{len(ids)} clips in batches of {batch_size} make {batches} loader batches: fewer than 4 "
                         f"per worker at {max(workers)} workers (raise --num-videos or lower --batch-size)")
    sources = {"original": videos_dir, **({"prepared": prepared_dir} if prepared_dir else {})}
    rows = []
    for source, folder in sources.items():
        paths = [str(folder / f"{video_id}.mp4") for video_id in ids]
        for w in workers:
            with ProcessPoolExecutor(w) if w else contextlib.nullcontext() as pool:
                passes = {"raw": raw_pass(paths, num_frames, pool, w),
                          "loader": loader_pass(annotations_dir, folder, num_frames, w, False, batch_size)}
                if source == "original":
                    passes["loader_cached"] = loader_pass(annotations_dir, folder, num_frames, w, True, batch_size)
                modes = {mode: len(paths) / seconds for mode, seconds in time_interleaved(passes, repeats).items()}
            raw, load = modes["raw"], other_load()
            for mode, clips in modes.items():
                rows.append({"source": source, "mode": mode, "workers": w, "num_videos": len(paths),
                             "num_frames": num_frames, "batch_size": batch_size, "clips_per_s": round(clips, 2),
                             "ratio": round(clips / raw, 3), "host_load": round(load, 2),
                             "pyav": av.__version__, "python": platform.python_version()})
                print(f"{source:9s} {mode:14s} workers={w}: {clips:8.2f} clips/s ({clips / raw:.2f}x raw)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """``vtr bench loader [--workers 0 1 2] [--num-videos 24] [--out runs/bench] ...``."""
    parser = argparse.ArgumentParser(prog="vtr bench loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations-dir", type=Path, help="MSR-VTT-layout folder (default: generated clips)")
    parser.add_argument("--videos-dir", type=Path, help="its videos (default: <annotations-dir>/videos)")
    parser.add_argument("--num-videos", type=int, default=32, help="generated clips")
    parser.add_argument("--seconds", type=int, default=8, help="length of the generated clips")
    parser.add_argument("--num-frames", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2,
                        help="the loader's batch size (>= 4 batches per worker; a worker produces whole batches)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-prepared", action="store_true", help="skip the vtr-prepared copies")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv[1:] if argv and argv[0] == "loader" else argv)
    torch.set_num_threads(1)  # the loader's transform runs beside the decoders, as in training
    root = args.annotations_dir or generate_clips(default_cache_dir() / "bench-loader" / f"{args.num_videos}x{args.seconds}s",
                                                  args.num_videos, args.seconds)
    videos = args.videos_dir or root / "videos"
    prepared = None
    if not args.no_prepared:
        prepared = root / "prepared" if not args.annotations_dir else args.out / "prepared-videos"
        if failures := prepare_folder(videos, prepared, max(args.workers) or 1):
            raise SystemExit(f"vtr bench loader: {len(failures)} videos could not be prepared")
    rows = run(root, videos, prepared, args.workers, args.num_frames, args.repeats, args.batch_size)
    path = args.out / result_filename("loader", torch.device("cpu"), "uint8", os.cpu_count() or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return rows
