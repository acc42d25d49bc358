"""What every text-conditioned scorer must satisfy: gallery chunking changes nothing, and the
score is not a dot product of fixed embeddings (its [Q, N] matrix has rank above D)."""

import pytest
import torch
from fakes import random_tokens, random_videos

from baselines.clip4clip import TightTransf
from baselines.glccl import GLCCL
from baselines.xclip import XCLIP
from baselines.xpool import XPool


@pytest.fixture(scope="module", params=[XCLIP, XPool, GLCCL, TightTransf], ids=lambda c: c.__name__)
def micro(request):
    torch.manual_seed(0)
    return request.param(backbone="vtr-micro", num_frames=4).double().eval()


def _gallery(model, frames, mask):
    """The video features evaluation scores: ``encode_video``, then ``prepare_gallery`` (X-Pool's inference cache)."""
    return model.prepare_gallery(model.encode_video(frames, mask))


def _inputs(n_videos=7, n_texts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, 4, 32, g, torch.float64, padded=1)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_chunked_scoring_equals_unchunked(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, video = micro.encode_text(tokens), _gallery(micro, frames, mask)
        full = micro.score(text, video)
        torch.testing.assert_close(micro.score_gallery(text, video, chunk_size=3), full, rtol=0, atol=1e-6)
        torch.testing.assert_close(micro.similarity(text, video, chunk_size=3), full, rtol=0, atol=1e-6)


def test_score_is_not_a_dot_product(micro):
    """An offline method's [Q, N] matrix has rank <= D; a text-conditioned one's exceeds it."""
    d = micro.clip.embed_dim
    frames, mask, tokens = _inputs(n_videos=d + 16, n_texts=d + 16, seed=1)
    with torch.no_grad():
        scores = micro.score(micro.encode_text(tokens), _gallery(micro, frames, mask))
    assert micro.fusion_free is False
    assert torch.linalg.matrix_rank(scores).item() > d


def test_the_pair_budget_sizes_gallery_chunks(micro, monkeypatch):
    """``eval_chunk_pairs`` shrinks the gallery chunk as the query batch grows (never below 16
    videos, never above ``eval_chunk_size``), and the scores do not change."""
    frames, mask, tokens = _inputs(n_videos=40, n_texts=5)
    with torch.no_grad():
        text, video = micro.encode_text(tokens), _gallery(micro, frames, mask)
        full = micro.score(text, video)
        sizes: list[int] = []
        original = micro.score
        monkeypatch.setattr(micro, "score", lambda t, v: sizes.append(len(v)) or original(t, v))
        monkeypatch.setattr(micro, "eval_chunk_size", 32)
        monkeypatch.setattr(micro, "eval_chunk_pairs", 5 * 20)  # 20 videos for 5 queries
        torch.testing.assert_close(micro.score_gallery(text, video), full, rtol=0, atol=1e-6)
        assert sizes == [20, 20]
        sizes.clear()
        micro.score_gallery(text[:1], video)  # 100 pairs for 1 query: capped by eval_chunk_size
        assert sizes == [32, 8]
        sizes.clear()
        monkeypatch.setattr(micro, "eval_chunk_pairs", 5)  # 1 video per call? no: at least 16
        micro.score_gallery(text, video)
        assert sizes == [16, 16, 8]


def test_a_gallery_on_cuda_takes_the_cuda_pair_budget_uncapped_and_an_explicit_budget_wins():
    """The rule alone (a ``torch.device``, no GPU needed): the CUDA budget sets the chunk on a CUDA
    gallery whatever ``eval_chunk_size`` is, and the CPU keeps its cache-sized rule."""
    from baselines.glccl import GLCCL
    from baselines.xclip import XCLIP
    from baselines.xpool import XPool

    model = XCLIP(backbone="vtr-micro")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.gallery_chunk(1, cpu) == 512 and model.gallery_chunk(64, cpu) == 48  # 3072 pairs / 64
    assert model.gallery_chunk(1, cuda) == 65536 and model.gallery_chunk(64, cuda) == 1024  # 65536 pairs
    assert model.gallery_chunk(10**6, cuda) == 16
    assert XPool.eval_chunk_pairs_cuda == GLCCL.eval_chunk_pairs_cuda == 65536  # the three measured on an H200
    model.set_pair_budget(256)  # an explicit budget: the same on every device
    assert model.gallery_chunk(1, cuda) == model.gallery_chunk(1, cpu) == 256 and model.gallery_chunk(4, cuda) == 64
    model.set_pair_budget(None)  # none: eval_chunk_size videos per call, on every device
    assert model.gallery_chunk(64, cuda) == model.gallery_chunk(64, cpu) == 512
