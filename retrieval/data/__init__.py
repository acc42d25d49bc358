"""The data layer: annotation readers, PyAV decoding and frame sampling, the synthetic
benchmark and the DataModule. Never imports model code."""

from retrieval.data.datamodule import ClipTransform, PairBatchSampler, VideoTextDataModule
from retrieval.data.formats import READERS, VideoRecord, read_split
from retrieval.data.synthetic import generate, pair_info
from retrieval.data.video import VideoDecodeError, read_frames, sample_indices, write_video

__all__ = [
    "READERS",
    "ClipTransform",
    "PairBatchSampler",
    "VideoDecodeError",
    "VideoRecord",
    "VideoTextDataModule",
    "generate",
    "pair_info",
    "read_frames",
    "read_split",
    "sample_indices",
    "write_video",
]
