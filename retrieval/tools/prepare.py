"""``vtr prepare``: the CLIP4Clip lineage's optional re-encode of a video folder, with PyAV.

The lineage's ``preprocess/compress_video.py`` (copied unchanged by X-Pool, X-CLIP, TS2-Net,
Prompt Switch, CenterCLIP) runs, per file,
``ffmpeg -i IN -filter:v scale='if(gt(a,1),trunc(oh*a/2)*2,224)':'if(gt(a,1),224,trunc(ow*a/2)*2)' -map 0:v -r 3 OUT``:
short side 224 (the long side keeps the aspect, rounded down to even), video only, 3 fps,
same file name. ``prepare_video`` runs the same FFmpeg filters (``scale`` with that
expression, then ``fps=3``) through PyAV's filter graph and encodes H.264 (VP9 for ``.webm``).

Differences on purpose: for portrait clips (``a = w/h < 1``) the lineage's height
``trunc(ow*a/2)*2`` squashes the frame (a 90x160 clip becomes 224x126, the short side no
longer 224); vtr uses ``trunc(ow/a/2)*2`` (224x398), keeping the aspect as the script
intends. Landscape clips get the lineage's exact sizes. The output folder must differ from the input folder (originals are
never overwritten); a file is written to ``<name>.partial`` and renamed when complete, so an
interrupted run resumes by skipping finished files; a file that fails is reported (path and
reason) instead of being replaced by a copy of the original. Files run in parallel in
processes, with a progress bar. Training on re-encoded videos and testing on originals is
known to cost accuracy (CLIP4Clip#63): prepare both splits or neither.
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

import av
from tqdm import tqdm

from retrieval.data.formats import VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

FPS = 3
SHORT_SIDE = 224
SCALE = ("w=if(gt(a\\,1)\\,trunc(oh*a/2)*2\\,{s}):h=if(gt(a\\,1)\\,{s}\\,trunc(ow/a/2)*2)")
"""The lineage's scale expression with its portrait branch fixed (``ow/a``, not ``ow*a``);
commas escaped for the filter's option parser."""
INPUT_SUFFIXES = (*VIDEO_EXTENSIONS, ".mov", ".3gp", ".mpg", ".mpeg", ".wmv", ".flv")


def _filter_graph(stream, fps: int, short_side: int) -> av.filter.Graph:
    graph = av.filter.Graph()
    source = graph.add_buffer(template=stream)
    scale = graph.add("scale", SCALE.format(s=short_side))
    rate = graph.add("fps", f"fps={fps}")
    sink = graph.add("buffersink")
    source.link_to(scale)
    scale.link_to(rate)
    rate.link_to(sink)
    graph.configure()
    return graph


def prepare_video(source: str | Path, target: str | Path, fps: int = FPS, short_side: int = SHORT_SIDE) -> int:
    """Re-encodes one video: ``fps`` frames per second, short side ``short_side``, no audio.

    Writes ``target.partial`` and renames it to ``target`` once complete.

    Returns:
        The number of frames written.

    Raises:
        ValueError: The source has no video stream, or decodes to no frame (the message names it).
    """
    source, target = Path(source), Path(target)
    partial = target.with_name(target.name + ".partial")
    codec = "libvpx-vp9" if target.suffix.lower() == ".webm" else "libx264"
    written = 0
    try:
        with av.open(str(source)) as inp:
            if not inp.streams.video:
                raise ValueError(f"{source}: no video stream")
            stream = inp.streams.video[0]
            graph = _filter_graph(stream, fps, short_side)
            with av.open(str(partial), "w", format=_container(target)) as out:
                encoder = None
                for frame in _filtered(inp.decode(stream), graph):
                    if encoder is None:
                        encoder = out.add_stream(codec, rate=fps)
                        encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, "yuv420p"
                        encoder.codec_context.time_base = Fraction(1, fps)
                    frame.pts, frame.time_base = written, Fraction(1, fps)
                    out.mux(encoder.encode(frame.reformat(format="yuv420p")))
                    written += 1
                if encoder is None:
                    raise ValueError(f"{source}: no frame decoded")
                out.mux(encoder.encode(None))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _container(target: Path) -> str | None:
    """FFmpeg muxer for the target's suffix (``.m4v`` and DiDeMo's other names → mp4-family)."""
    return {".m4v": "mp4", ".mov": "mov", ".3gp": "3gp", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}.get(
        target.suffix.lower(), "mp4")


def _filtered(frames, graph):
    for frame in frames:
        graph.push(frame)
        yield from _drain(graph)
    graph.push(None)
    yield from _drain(graph)


def _drain(graph):
    while True:
        try:
            yield graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return


def plan(input_dir: Path, output_dir: Path) -> tuple[list[tuple[Path, Path]], int]:
    """``(source, target)`` for every video under ``input_dir`` whose target is not written
    yet, and the number already done. Relative paths and file names are kept."""
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise ValueError(f"--out {output_dir} must not be {input_dir} or inside it: originals are never overwritten")
    sources = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
    if not sources:
        raise FileNotFoundError(f"no video files ({', '.join(INPUT_SUFFIXES)}) under {input_dir}")
    pairs = [(s, output_dir / s.relative_to(input_dir)) for s in sources]
    todo = [(s, t) for s, t in pairs if not t.is_file()]
    return todo, len(pairs) - len(todo)


def _work(source: Path, target: Path, fps: int, short_side: int) -> tuple[Path, int | None, str | None]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return source, prepare_video(source, target, fps, short_side), None
    except (av.FFmpegError, ValueError, OSError) as error:
        return source, None, str(error)


def prepare_folder(input_dir: Path, output_dir: Path, workers: int, fps: int = FPS,
                   short_side: int = SHORT_SIDE) -> dict[Path, str]:
    """Re-encodes every video of a folder in ``workers`` processes; returns the failures."""
    todo, done = plan(input_dir, output_dir)
    log.warning("vtr prepare: %d videos to write, %d already in %s", len(todo), done, output_dir)
    failures: dict[Path, str] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_work, s, t, fps, short_side) for s, t in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="vtr prepare", unit="video"):
            source, _, error = future.result()
            if error is not None:
                failures[source] = error
    for source, error in failures.items():
        log.error("vtr prepare: %s failed: %s", source, error)
    return failures


def main(argv: list[str] | None = None) -> None:
    """``vtr prepare INPUT_DIR --out OUTPUT_DIR [--workers N] [--fps 3] [--short-side 224]``."""
    parser = argparse.ArgumentParser(prog="vtr prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path, help="folder of the original videos (read only)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (same file names), not INPUT_DIR")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE)
    args = parser.parse_args(argv[1:] if argv and argv[0] == "prepare" else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    failures = prepare_folder(args.input_dir, args.out, args.workers, args.fps, args.short_side)
    if failures:
        raise SystemExit(f"vtr prepare: {len(failures)} videos failed (listed above); rerun to retry them")
