"""The data layer: annotation readers, PyAV decoding and frame sampling, the synthetic
benchmark (``synthetic``; its scenes in ``synthetic_scene``, its templates in
``synthetic_templates``), the CLIP frame transform (``transforms``), the datasets (``datasets``), the pair
batch sampler (``sampler``) and the DataModule (``datamodule``). Never imports model code."""

from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.formats import READERS, VideoRecord, read_split
from retrieval.data.sampler import PairBatchSampler
from retrieval.data.synthetic import generate, pair_info
from retrieval.data.transforms import ClipTransform, normalize_frames
from retrieval.data.video import VideoDecodeError, read_frames, sample_indices, write_video

__all__ = [
    "READERS",
    "ClipTransform",
    "normalize_frames",
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
