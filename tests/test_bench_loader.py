"""``vtr bench loader``: the raw baseline decodes the very frames the loader samples."""

import numpy as np

from retrieval.bench.loader import generate_clips, raw_decode
from retrieval.data.video import read_frames


def test_raw_baseline_decodes_the_loaders_frames(tmp_path):
    root = generate_clips(tmp_path, num_videos=1, seconds=1, fps=30, size=(48, 64))
    path = root / "videos" / "video0.mp4"
    raw = raw_decode(str(path), 5)
    frames, mask = read_frames(path, 5, "uniform")
    assert raw.shape == (5, 48, 64, 3) and mask.all()
    np.testing.assert_array_equal(raw, frames)
    assert (root / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[1] == "ret0,msr0,video0,clip 0"
