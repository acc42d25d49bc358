"""DSL and QB-Norm on hand-computed matrices, and as labelled rows of ``vtr test``."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from baselines.clip4clip import MeanPool
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.video import write_video
from retrieval.metrics import retrieval_metrics
from retrieval.postprocess import Postprocess, dual_softmax, querybank_normalize
from retrieval.training import RetrievalModule

E = math.exp


def test_dual_softmax_prior_is_over_the_query_axis():
    s = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    before = s.clone()
    out = dual_softmax(s)
    col0 = E(2) + E(1) + E(0)  # video 0's prior: softmax over the three queries
    col1 = E(0) + E(-1) + E(1)
    expected = [[2 * E(2) / col0, 0.0], [E(1) / col0, -1 * E(-1) / col1], [0.0, 1 * E(1) / col1]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(s, before) and out.dtype == torch.float64
    # all-negative scores: the prior multiplies, so query 0's best video (0: -1 > -3) gets the
    # large prior, becomes the more negative score and falls behind video 1 (DSL assumes s > 0)
    neg = dual_softmax(torch.tensor([[-1.0, -3.0], [-3.0, -1.0]], dtype=torch.float64))
    z = E(-1) + E(-3)
    torch.testing.assert_close(neg[0], torch.tensor([-1 * E(-1) / z, -3 * E(-3) / z], dtype=torch.float64))
    assert neg[0, 1] > neg[0, 0]


def test_dual_softmax_ties_temperature_and_no_overflow():
    tied = dual_softmax(torch.ones(2, 3))
    assert torch.equal(tied, torch.full((2, 3), 0.5))  # every column's prior is uniform over 2 queries
    big = dual_softmax(torch.tensor([[1000.0, 0.0], [999.0, 0.0]]), temperature=1.0)
    assert torch.isfinite(big).all()
    assert big[0, 0].item() == pytest.approx(1000 / (1 + E(-1)))
    soft = dual_softmax(torch.tensor([[2.0], [0.0]]), temperature=2.0)
    assert soft[0, 0].item() == pytest.approx(2 * E(1) / (E(1) + 1))
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(torch.ones(2, 2), temperature=0)


BANK = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]], dtype=torch.float64)  # both bank rows retrieve video 0
TEST = torch.tensor([[0.5, 0.3, 0.2],      # top-1 video 0: re-scored
                     [0.1, 0.6, 0.2],      # top-1 video 1: not retrieved by the bank, kept raw
                     [-0.4, -0.4, -0.9]],  # tie for top-1, negative: video 0 (lowest index) -> re-scored
                    dtype=torch.float64)
NORM = [E(0.9) + E(0.8), E(0.1) + E(0.2), E(0.0) + E(0.1)]  # per-video sum over the bank, beta = 1


def test_querybank_normalize_hand_computed():
    test, bank = TEST.clone(), BANK.clone()
    out = querybank_normalize(test, bank, beta=1.0, k=1)
    expected_0 = [E(0.5) / NORM[0], E(0.3) / NORM[1], E(0.2) / NORM[2]]
    expected_2 = [E(-0.4) / NORM[0], E(-0.4) / NORM[1], E(-0.9) / NORM[2]]
    torch.testing.assert_close(out[0], torch.tensor(expected_0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out[2], torch.tensor(expected_2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(out[1], TEST[1])  # the row that does not change is bit-identical
    assert torch.equal(test, TEST) and torch.equal(bank, BANK)  # inputs untouched
    # k = 2: the bank retrieves videos {0, 1}, so row 1 is re-scored as well
    out2 = querybank_normalize(TEST, BANK, beta=1.0, k=2)
    torch.testing.assert_close(out2[1], torch.tensor([E(0.1) / NORM[0], E(0.6) / NORM[1], E(0.2) / NORM[2]],
                                                     dtype=torch.float64), rtol=1e-12, atol=0)


def test_querybank_normalize_bank_ties_and_scale():
    # a bank row tied between videos 0 and 1 retrieves video 0 (lowest index), so a test row
    # whose top-1 is video 1 keeps its raw scores
    out = querybank_normalize(torch.tensor([[0.1, 0.5]]), torch.tensor([[0.5, 0.5]]), beta=20.0)
    assert torch.equal(out, torch.tensor([[0.1, 0.5]]))
    # logits at scale 100 with beta 20 overflow the official exp(); the log-space form does not
    s = torch.tensor([[80.0, 10.0]], dtype=torch.float64)
    bank = torch.tensor([[79.0, 10.0], [70.0, 5.0]], dtype=torch.float64)
    out = querybank_normalize(s, bank, beta=20.0)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(E(20) / (1 + E(-180)), rel=1e-12)
    assert out[0, 1].item() == pytest.approx(1 / (1 + E(-100)), rel=1e-12)
    # beta 20 on cosines = beta 0.2 on the same scores x 100
    cos = TEST / 2
    torch.testing.assert_close(querybank_normalize(cos * 100, BANK / 2 * 100, beta=0.2)[[0, 2]],
                               querybank_normalize(cos, BANK / 2, beta=20.0)[[0, 2]], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="k must be"):
        querybank_normalize(TEST, BANK, k=4)
    with pytest.raises(ValueError, match="share N"):
        querybank_normalize(TEST, BANK[:, :2])


@pytest.fixture
def msvd_videos(tmp_path):
    """An MSVD-format folder: 6 train and 4 test clips of 8 frames, 1-3 captions each."""
    rng = np.random.default_rng(0)
    captions, videos = {}, tmp_path / "videos"
    videos.mkdir()
    for i in range(10):
        video_id = f"clip{i}_0_{i + 1}"
        captions[video_id] = [f"a {color} thing number {i}" for color in ("red", "green", "blue")[: 1 + i % 3]]
        write_video(videos / f"{video_id}.avi", rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), codec="mpeg4")
    (tmp_path / "captions_msvd.json").write_text(json.dumps(captions))
    ids = list(captions)
    for split, chosen in (("train", ids[:6]), ("val", ids[6:]), ("test", ids[6:])):
        (tmp_path / f"{split}_list.txt").write_text("".join(f"{v}\n" for v in chosen))
    return tmp_path


class _KeepsFeatures(RetrievalModule):
    """Keeps the gathered evaluation features (the module itself releases them after the epoch)."""

    def gather_eval_features(self):
        self.kept = super().gather_eval_features()
        return self.kept


def test_postprocess_rows_beside_the_plain_ones(msvd_videos, trainer_kwargs):
    data = VideoTextDataModule(dataset="msvd", root=str(msvd_videos), num_frames=4, batch_size=2, eval_batch_size=4)
    post = Postprocess(dsl=True, qb_norm=True, querybank_size=5, qb_k=2)
    model = _KeepsFeatures(MeanPool(num_frames=4)).eval()
    result = L.Trainer(**trainer_kwargs, callbacks=[post]).test(model, data, verbose=False)[0]
    text, video, caption_video = model.kept
    assert len(text) == 1 + 2 + 3 + 1 and len(video) == 4  # clips 6..9: multi-caption test set
    similarity = model.retriever.similarity(text, video)
    for key, value in retrieval_metrics(similarity, caption_video).items():
        assert result[f"test/{key}"] == pytest.approx(value, abs=1e-4)  # the plain rows are unchanged
    for key, value in retrieval_metrics(dual_softmax(similarity), caption_video).items():
        assert result[f"test/{key.replace('/', '+DSL/')}"] == pytest.approx(value, abs=1e-4)
    assert "test/t2v+QB/R@1" in result and not any(k.startswith("test/v2t+QB") for k in result)
