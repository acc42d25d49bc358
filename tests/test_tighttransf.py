"""CLIP4Clip tightTransf: parameters, initialisation from CLIP, the per-pair cross transformer, chunking, training."""

import lightning as L
import official
import pytest
import torch
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.clip4clip import TightTransf
from retrieval.training import RetrievalModule


@pytest.fixture(scope="module")
def vitb32():
    return TightTransf(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return TightTransf(backbone="vtr-micro", num_frames=4).double().eval()


def _inputs(n_videos=7, n_texts=5, t=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, t, size, g, torch.float64, padded=1)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_new_parameters_at_vit_b32(vitb32):
    # 4 CLIP text blocks 4 x 3,152,384 + positions 77 x 512 + pooler (LN 1,024 + Linear 262,656)
    # + similarity_dense 513; methods.md ~12.9 M. Exact:
    assert sum(p.numel() for p in vitb32.new_parameters()) == 12_913_153


def test_initialised_from_clip_text_tower(vitb32):
    cross, clip = vitb32.cross, vitb32.clip
    assert torch.equal(cross.position_embeddings.weight, clip.positional_embedding)
    for copy, original in zip(cross.blocks, clip.text_blocks):
        for (name, p), q in zip(copy.named_parameters(), original.parameters()):
            assert torch.equal(p, q) and p is not q, name
    assert len(cross.blocks) == 4 and cross.dropout.p == 0.1
    assert not cross.dense.bias.any() and not vitb32.similarity_dense.bias.any()
    assert vitb32.similarity_dense.out_features == 1


def test_score_is_the_official_cross_model_without_logit_scale(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        got = micro.score(text, video)
        cross, dense = micro.cross, micro.similarity_dense
        heads = cross.blocks[0].attn.num_heads
        for i, s in enumerate(text.eot):  # one pair at a time, as a reader would write it
            for j, (f, m) in enumerate(zip(video.frames, video.frame_mask)):
                x = torch.cat([s[None], f[m]])[None] + cross.position_embeddings.weight[: 1 + int(m.sum())]
                # module_cross.CrossModel in float64 (eps 1e-12 blocks; vtr-micro runs the exact GELU)
                x = official.transformer(x, cross.blocks, heads, act=official.gelu)
                first = official.layer_norm(x[:, 0], cross.ln_pool.weight, cross.ln_pool.bias)
                pooled = official.quick_gelu(first @ cross.dense.weight.T + cross.dense.bias)  # CrossPooler
                logit = (pooled @ dense.weight.T + dense.bias)[0, 0]  # similarity_dense
                torch.testing.assert_close(got[i, j], logit, rtol=1e-12, atol=1e-12)
        micro.clip.logit_scale.add_(1.0)
        torch.testing.assert_close(micro.score(text, video), got)  # no logit scale
        micro.clip.logit_scale.sub_(1.0)


def test_fit_and_test_run(trainer_kwargs):
    model = TightTransf(backbone="vtr-tiny", num_frames=4)
    module = RetrievalModule(model, eval_chunk_size=3)
    data = FakeVideoText(num_frames=4)
    trainer = L.Trainer(**trainer_kwargs, max_steps=2)
    trainer.fit(module, data)
    results = trainer.test(module, data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert results["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert results["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
