"""``vtr bench loader``: the raw baseline decodes the very frames the loader samples."""

import numpy as np
import pytest

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


def test_bench_loader_end_to_end_and_its_batch_rule(tmp_path):
    from retrieval.bench.loader import main

    root = generate_clips(tmp_path / "clips", num_videos=4, seconds=1, fps=10, size=(48, 64))
    rows = main(["--annotations-dir", str(root), "--workers", "0", "--num-frames", "4", "--batch-size", "1",
                 "--repeats", "1", "--no-prepared", "--out", str(tmp_path / "out")])
    assert [(r["source"], r["mode"]) for r in rows] == [("original", "raw"), ("original", "loader"),
                                                          ("original", "loader_cached")]
    assert all(r["clips_per_s"] > 0 and r["batch_size"] == 1 for r in rows) and rows[0]["ratio"] == 1.0
    assert len(list((tmp_path / "out").glob("loader_*.csv"))) == 1
    with pytest.raises(ValueError, match="fewer than 4 per worker"):  # 4 clips, one batch: a worker would idle
        main(["--annotations-dir", str(root), "--workers", "1", "--batch-size", "4", "--no-prepared",
              "--out", str(tmp_path / "out2")])
