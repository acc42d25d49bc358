"""CLIP2Video: new parameters, CLIP-text initialisation, the one-dot-product mix, the two-term loss."""

import lightning as L
import official
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.clip2video import CLIP2Video
from baselines.clip4clip import MeanPool
from retrieval.training import RetrievalModule


@pytest.fixture(scope="module")
def b32():
    torch.manual_seed(0)
    return CLIP2Video(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP2Video(backbone="vtr-tiny").eval()


def _batch(b=3, t=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(b, t, size, g, padded=2)
    return frames, mask, random_tokens(b, 32, g, lengths=[4 + 3 * i for i in range(b)])


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_new_parameter_count_at_vit_b32(b32):
    # 6 copied text blocks (4 temporal, 1 difference attention, 1 actionClip) + 77 frame positions
    # + 2 type rows + the difference LayerNorm + 2 x K=5 centres; methods.md: "~19M" (142.46M - 123.52M)
    block = sum(p.numel() for p in b32.clip.text_blocks[0].parameters())
    expected = 6 * block + 77 * 512 + 2 * 512 + 2 * 512 + 2 * 5 * 512
    total = sum(p.numel() for p in b32.new_parameters())
    assert total == expected == 18_960_896
    assert abs(total - 19.0e6) / 19.0e6 < 0.01


def test_blocks_and_embeddings_start_as_clip_text(b32):
    text = b32.clip.text_blocks
    for i, block in enumerate(b32.temporal_blocks):
        assert _same(block, text[i])
    assert _same(b32.tdb.difference_attention[0], text[0])
    assert _same(b32.action_blocks[0], text[0])
    pos = b32.clip.positional_embedding
    assert torch.equal(b32.tdb.frame_position_embeddings.weight, pos)
    assert torch.equal(b32.tdb.type_embedding.weight, pos[:2])
    # copies, trained separately: no storage shared with CLIP
    assert b32.action_blocks[0].attn.in_proj_weight.data_ptr() != text[0].attn.in_proj_weight.data_ptr()
    assert b32.tab.centers.shape == (5, 512)


def test_one_dot_product_is_the_mixed_score(tiny):
    frames, mask, tokens = _batch()
    with torch.no_grad():
        video, text = tiny.encode_video(frames, mask), tiny.encode_text(tokens)
        assert list(video) == ["embedding"] and list(text) == ["embedding"]
        scale = tiny.logit_scale()
        assert scale > 0
        torch.testing.assert_close(tiny.score(text, video), scale * text.embedding @ video.embedding.T)
        # the two branches computed separately
        x = tiny.clip.encode_frames(frames)
        v_glob = tiny.global_embedding(x, mask)
        v_tab = tiny.tab(*tiny.video_alignment_tokens(x, mask))
        sentence, words = tiny.clip.encode_text(tokens)
        word_mask = tokens != 0
        word_mask[:, 0] = False
        t_glob, t_tab = F.normalize(sentence, dim=-1), tiny.tab(words, word_mask)
        expected = 0.5 * scale * t_glob @ v_glob.T + 0.5 * scale * t_tab @ v_tab.T
        torch.testing.assert_close(tiny.score(text, video), expected, rtol=1e-5, atol=1e-5)
        assert video.embedding.shape == (3, 2 * tiny.clip.embed_dim)


def test_training_loss_is_the_official_two_term_mix(tiny):
    frames, mask, tokens = _batch()
    with torch.no_grad():
        video, text = tiny.encode_video(frames, mask), tiny.encode_text(tokens)
        assert tiny.loss_weights == {"contrastive": 0.5, "tab": 0.5}
        module = RetrievalModule(tiny)
        terms, _ = module.contrastive_losses(text, video)
        assert set(terms) == {"contrastive", "tab"}
        loss = terms["contrastive"] + terms["tab"]
        # the branch embeddings computed separately (not by slicing the mix), in float64
        x = tiny.clip.encode_frames(frames)
        v_glob = tiny.global_embedding(x, mask).double()
        v_tab = tiny.tab(*tiny.video_alignment_tokens(x, mask)).double()
        sentence, words = tiny.clip.encode_text(tokens)
        word_mask = tokens != 0
        word_mask[:, 0] = False
        t_glob, t_tab = F.normalize(sentence, dim=-1).double(), tiny.tab(words, word_mask).double()
        scale = tiny.logit_scale().double()
        ce = official.symmetric_cross_entropy  # CrossEn both ways, written by hand
        ce_glob, ce_tab = ce(scale * t_glob @ v_glob.T), ce(scale * t_tab @ v_tab.T)
        expected = 0.5 * ce_glob + 0.5 * ce_tab
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        # each weight on its own term: w CE(glob) and (1 - w) CE(tab), here at w = 0.3 (the branch
        # halves are re-normalised, so the same features serve)
        tiny.center_weight = 0.3
        try:
            terms, _ = module.contrastive_losses(text, video)
        finally:
            tiny.center_weight = 0.5
        torch.testing.assert_close(terms["contrastive"].double(), 0.3 * ce_glob, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms["tab"].double(), 0.7 * ce_tab, rtol=1e-5, atol=1e-6)
        mixed = tiny.score(text, video).double()
        assert abs(loss.double() - ce(mixed)) > 1e-4  # CE(0.5 A + 0.5 B) is another loss (here by 5e-4)


def _official_tdb(frames, mask, tdb, heads):
    """CLIP2Video's ``temporal_difference_block`` (``sigmoid_selfA``) plus its position and type embeddings."""
    t, d = frames.shape[1:]
    positions, types = tdb.frame_position_embeddings.weight[:t], tdb.type_embedding.weight
    dif = frames[:, 1:] - frames[:, :-1] + positions[1:]  # f_{t+1} - f_t
    dif = official.transformer(dif, tdb.difference_attention, heads, mask[:, 1:], act=official.gelu)
    norm = tdb.difference_norm  # torch.nn.LayerNorm(512) in the code: eps 1e-5
    dif = 2 * torch.sigmoid(official.layer_norm(dif, norm.weight, norm.bias, eps=1e-5)) - 1
    middle = torch.cat([frames, dif], dim=1)
    middle_positions = torch.cat([positions, positions])
    middle_types = torch.cat([types[1].expand(t, d), types[0].expand(t - 1, d)])  # ids 1 frames, 0 differences
    middle_mask = torch.cat([mask, mask], dim=1)
    order = [i for k in range(t - 1) for i in (k, t + k)] + [t - 1]  # f_1, d_1, f_2, ..., d_{T-1}, f_T
    return middle[:, order] + middle_positions[order] + middle_types[order], middle_mask[:, order]


def test_tdb_and_global_branch_match_the_official_code():
    """Float64 restatement of ``temporal_difference_block`` and ``_similarity_TDB`` (trained-like weights).

    vtr-micro is random-init, so its blocks run the exact GELU; the head blocks' LayerNorms use 1e-12.
    """
    torch.manual_seed(0)
    model = CLIP2Video(backbone="vtr-micro", num_frames=6).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        frames = torch.randn(3, 6, 64, generator=g, dtype=torch.float64)
        mask = torch.ones(3, 6, dtype=torch.bool)
        mask[0, -2:] = False
        mask[2, -1] = False
        heads = model.tdb.difference_attention[0].attn.num_heads
        tokens, token_mask = model.tdb(frames, mask)
        expected_tokens, expected_mask = _official_tdb(frames, mask, model.tdb, heads)
        torch.testing.assert_close(tokens, expected_tokens, rtol=1e-12, atol=1e-12)
        assert torch.equal(token_mask, expected_mask)
        out = official.transformer(expected_tokens, model.temporal_blocks, heads, expected_mask, act=official.gelu)
        expected_video = official.mean_pool(out[:, 0::2] + frames, mask)
        torch.testing.assert_close(model.global_embedding(frames, mask), expected_video, rtol=1e-12, atol=1e-12)


def test_frame_order_matters_unlike_mean_pooling(tiny):
    frames, mask, _ = _batch()
    mask[:] = True
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = tiny.encode_video(frames, mask).embedding
        b = tiny.encode_video(frames[:, perm], mask).embedding
        assert (a - b).abs().max() > 1e-4
        torch.manual_seed(0)
        meanp = MeanPool(backbone="vtr-tiny").eval()
        torch.testing.assert_close(meanp.encode_video(frames, mask).embedding,
                                   meanp.encode_video(frames[:, perm], mask).embedding)


@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_any_frame_count_including_odd(tiny, t):
    frames, mask, _ = _batch(b=2, t=t)
    mask[:] = True
    with torch.no_grad():
        emb = tiny.encode_video(frames, mask).embedding
    assert emb.shape == (2, 2 * tiny.clip.embed_dim) and torch.isfinite(emb).all()


@pytest.mark.parametrize(("option", "value"), [("center_weight", 1.5), ("num_centers", 0)])
def test_bad_config_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        CLIP2Video(backbone="vtr-micro", **{option: value})


def test_fit_and_test_smoke(trainer_kwargs):
    torch.manual_seed(0)
    model = CLIP2Video(backbone="vtr-tiny", num_frames=4)
    data = FakeVideoText(num_videos=7, num_frames=4, size=64, batch_size=4)
    module = RetrievalModule(model)
    trainer = L.Trainer(**trainer_kwargs)
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/tab" in trainer.callback_metrics
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert metrics["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert metrics["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
