"""X-Pool (Gorti et al. 2022): parameters, identity init, the official block, chunking, training."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.xpool import TextConditionedPooling, XPool
from retrieval.recipes import read_recipe
from retrieval.training import RetrievalModule

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "model" / "xpool.yaml"


@pytest.fixture(scope="module")
def vitb32():
    return XPool(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = XPool(backbone="vtr-micro", num_frames=4).double().eval()
    with torch.no_grad():  # move away from the identity init so every projection matters
        for p in model.pool_frames.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(n_videos=7, n_texts=5, t=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, t, size, g, torch.float64, padded=0)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_new_parameters_at_vit_b32(vitb32):
    # 5 Linear(512, 512) = 5 x 262,656 + 3 LayerNorms x 1,024; methods.md: ~1.32 M. Exact:
    assert sum(p.numel() for p in vitb32.new_parameters()) == 1_316_352


def test_projections_start_at_identity_with_zero_bias(vitb32):
    pool = vitb32.pool_frames
    for layer in (pool.q_proj, pool.k_proj, pool.v_proj, pool.out_proj, pool.linear_proj):
        assert torch.equal(layer.weight, torch.eye(512)) and not layer.bias.any()
    assert pool.dropout.p == 0.3
    optim = read_recipe(RECIPE)["model"]["optim"]  # the optimiser is the recipe's
    assert optim["decay_all"] and optim["lr"] == 3e-5 and optim["clip_lr"] == 1e-6


def test_score_matches_the_official_block(micro):
    """The eval path against a literal restatement of xpool's Transformer (W_o applied after
    pooling, not folded; the pooled value through LN₂, W_lin and LN₃)."""
    frames, mask, tokens = _inputs()
    model, pool = micro, micro.pool_frames
    with torch.no_grad():
        text, video = model.encode_text(tokens), model.prepare_gallery(model.encode_video(frames, mask))
        got = model.score(text, video)
        one = model.score(text[:1], video)  # a single query takes the batched-gemv path
        t, _ = model.clip.encode_text(tokens)
        v = model.clip.encode_frames(frames)  # un-normalised CLIP frame features [N, T, D]
        tn, vn = pool.layer_norm1(t), pool.layer_norm1(v)
        q = pool.q_proj(tn)  # [Q, D]
        k, val = pool.k_proj(vn), pool.v_proj(vn)  # [N, T, D]
        attn = ((k @ q.T) / math.sqrt(q.shape[-1])).softmax(dim=1)  # [N, T, Q]
        r = pool.out_proj((val.transpose(1, 2) @ attn).permute(0, 2, 1))  # [N, Q, D]
        r = pool.layer_norm2(r)
        out = pool.layer_norm3(r + pool.linear_proj(r))  # [N, Q, D]
        expected = model.logit_scale() * torch.einsum("qd,nqd->qn", F.normalize(t, dim=-1), F.normalize(out, dim=-1))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(one, expected[:1])


def test_eval_rearrangement_is_the_block_in_fp32_at_vit_b32_shapes():
    """The eval path (Gram forms, no [Q, N, D] tensor) against the block as written, in float64:
    at D=512, T=12 its fp32 error is that of the literal fp32 block."""
    torch.manual_seed(0)
    pool = TextConditionedPooling(512).eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.05 * torch.randn_like(p))
        t, v = torch.randn(5, 512), 2 * torch.randn(40, 12, 512) + 0.3
        mask = torch.ones(40, 12, dtype=torch.bool)
        mask[::3, 9:] = False
        query, (keys, values), unit = pool.query(t), pool.keys_values(v), F.normalize(t, dim=-1)
        got = pool.pooled_cosine(query, unit, pool.text_terms(unit), keys, *pool.pooling_forms(values), mask).T  # [Q, N]
        pool.double()
        out = pool(query.double(), keys.double(), values.double(), mask[None])
        expected = torch.einsum("qnd,qd->qn", F.normalize(out, dim=-1), unit.double())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_training_keeps_the_literal_block_and_refuses_gallery_features(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, eval_video = micro.encode_text(tokens), micro.prepare_gallery(micro.encode_video(frames, mask))
        assert micro.prepare_gallery(eval_video) is eval_video  # already the gallery's
        micro.train()
        try:
            train_video = micro.encode_video(frames, mask)
            assert "frame_values" in train_video and "frame_values" not in eval_video
            assert set(train_video) == set(micro.eval().encode_video(frames, mask))  # whatever the mode
            micro.train()
            with pytest.raises(RuntimeError, match="prepare_gallery"):
                micro.score(text, eval_video)
            micro.pool_frames.dropout.p = 0.0  # without dropout the two paths are one function
            torch.testing.assert_close(micro.score(text, train_video), micro.score(text, eval_video))
        finally:
            micro.pool_frames.dropout.p = 0.3
            micro.eval()


def test_padded_frames_are_ignored(micro):
    frames, mask, tokens = _inputs()
    mask[0, -1] = False
    with torch.no_grad():
        text = micro.encode_text(tokens)
        full = micro.score(text, micro.prepare_gallery(micro.encode_video(frames, mask)))[:, 0]
        cut = micro.score(text, micro.prepare_gallery(micro.encode_video(frames[:1, :3], mask[:1, :3])))[:, 0]
    torch.testing.assert_close(full, cut)


def test_fit_and_test_run(trainer_kwargs):
    model = XPool(backbone="vtr-tiny", num_frames=4)
    module = RetrievalModule(model, optim=read_recipe(RECIPE)["model"]["optim"], eval_chunk_size=3)
    data = FakeVideoText(num_frames=4)
    trainer = L.Trainer(**trainer_kwargs, max_steps=2)
    trainer.fit(module, data)
    results = trainer.test(module, data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert results["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert results["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
