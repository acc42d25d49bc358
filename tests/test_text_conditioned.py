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


def _inputs(n_videos=7, n_texts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, 4, 32, g, torch.float64, padded=1)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_chunked_scoring_equals_unchunked(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        full = micro.score(text, video)
        torch.testing.assert_close(micro.score_gallery(text, video, chunk_size=3), full, rtol=0, atol=1e-6)
        torch.testing.assert_close(micro.similarity(text, video, chunk_size=3), full, rtol=0, atol=1e-6)


def test_score_is_not_a_dot_product(micro):
    """An offline method's [Q, N] matrix has rank <= D; a text-conditioned one's exceeds it."""
    d = micro.clip.embed_dim
    frames, mask, tokens = _inputs(n_videos=d + 16, n_texts=d + 16, seed=1)
    with torch.no_grad():
        scores = micro.score(micro.encode_text(tokens), micro.encode_video(frames, mask))
    assert micro.offline is False
    assert torch.linalg.matrix_rank(scores).item() > d
