"""X-CLIP (Ma et al. 2022): parameters, identity init, fixed T / L, the four-score head, chunking, training."""

import lightning as L
import official
import pytest
import torch
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.xclip import XCLIP, AttentionOverSimilarityMatrix
from retrieval.training import RetrievalModule


@pytest.fixture(scope="module")
def vitb32():
    return XCLIP(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return XCLIP(backbone="vtr-micro", num_frames=4).double().eval()


def _inputs(n_videos=7, n_texts=5, t=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, t, size, g, torch.float64, padded=1)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_new_parameters_at_vit_b32(vitb32):
    # seqTransf 4 x 3,152,384 + 77 x 512 = 12,648,960; A_g, A_l 2 x 512^2; 3 x 32^2 + 3 x 12^2 AOSM
    # = 527,792; methods.md: ~13.18 M (seqTransf ~12.65 M + ~0.53 M). Exact:
    assert sum(p.numel() for p in vitb32.new_parameters()) == 13_176_752
    assert sum(p.numel() for p in vitb32.temporal.parameters()) == 12_648_960


def test_mixing_matrices_start_at_identity(vitb32):
    head = vitb32.head
    assert torch.equal(head.global_mat_weight, torch.eye(512)) and torch.equal(head.local_mat_weight, torch.eye(512))
    sizes = {name: m.weight.shape[0] for name, m in head.named_modules() if isinstance(m, AttentionOverSimilarityMatrix)}
    assert sizes == {"video_word": 32, "sentence_frame": 12, "word_level": 32, "frame_level": 12,
                     "sentence_to_frame": 12, "video_to_word": 32}
    for m in head.modules():
        if isinstance(m, AttentionOverSimilarityMatrix):
            assert torch.equal(m.weight, torch.eye(m.weight.shape[0])) and m.temperature == 0.01


def test_aosm_is_softmax_weighted_sum_at_identity():
    sim = torch.randn(3, 5, 4)
    aosm = AttentionOverSimilarityMatrix(5)
    expected = ((sim / 0.01).softmax(dim=1) * sim).sum(dim=1)
    torch.testing.assert_close(aosm(sim, dim=1), expected)
    with torch.no_grad():
        aosm.weight.copy_(torch.randn(5, 5))
    mixed = torch.einsum("aln,lk,akn->an", (sim / 0.01).softmax(dim=1), aosm.weight, sim)
    torch.testing.assert_close(aosm(sim, dim=1), mixed)
    torch.testing.assert_close(aosm(sim.transpose(1, 2), dim=-1), mixed)


def test_four_scores_match_the_official_formulas(micro):
    """Score against a literal restatement of modeling_xclip.py (matmul / permute form), trained-like A's."""
    frames, mask, tokens = _inputs()
    model = micro
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        text, video = model.encode_text(tokens), model.encode_video(frames, mask)
        got = model.score_components(text, video)
        # the video side from the official seqTransf (float64 restatement; vtr-micro runs the exact GELU)
        clip_frames = model.clip.encode_frames(frames)
        temporal = model.temporal
        seq = official.seq_transf(clip_frames, mask, temporal.frame_position_embeddings.weight, temporal.blocks,
                                  temporal.blocks[0].attn.num_heads, act=official.gelu)
        v = official.mean_pool(seq, mask)  # [N, D]
        f = clip_frames / clip_frames.norm(dim=-1, keepdim=True)  # raw CLIP frames, normalised [N, T, D]
        h, sigma = model.head, model.logit_scale()
        s, w = text.sentence, text.words
        vs = sigma * (s @ h.global_mat_weight) @ v.T
        m = w @ v.T  # [Q, L, N]
        vw = sigma * (m * ((m / 0.01).softmax(dim=1).permute(0, 2, 1) @ h.video_word.weight).permute(0, 2, 1)).sum(1)
        n = s @ f.permute(0, 2, 1)  # [N, Q, T]
        sf = sigma * (n * ((n / 0.01).softmax(-1) @ h.sentence_frame.weight)).sum(-1).T
        fine = torch.einsum("qld,ntd->qlnt", w @ h.local_mat_weight, f)
        word_level = ((fine / 0.01).softmax(1).permute(0, 2, 3, 1) @ h.word_level.weight).permute(0, 3, 1, 2)
        word_level = (word_level * fine).sum(1)  # [Q, N, T]
        frame_level = (((fine / 0.01).softmax(-1) @ h.frame_level.weight) * fine).sum(-1)  # [Q, L, N]
        s2f = (((word_level / 0.01).softmax(-1) @ h.sentence_to_frame.weight) * word_level).sum(-1)
        v2w = (((frame_level / 0.01).softmax(1).permute(0, 2, 1) @ h.video_to_word.weight).permute(0, 2, 1) * frame_level).sum(1)
        fw = sigma * (s2f + v2w) / 2
    torch.testing.assert_close(got, torch.stack([vs, vw, sf, fw]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.score(text, video), got.mean(0))
    # the cached video side: the seqTransf video vector and the raw (normalised) CLIP frames
    torch.testing.assert_close(video.embedding, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(video.frames, f, rtol=1e-12, atol=1e-12)


def test_padding_masks_are_options(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        default = micro.score(text, video)
        micro.mask_padding_words = True
        masked = micro.score(text, video)
        # masking = scoring each caption cut to its real tokens... padding words changed the score
        assert not torch.allclose(default, masked)
        micro.mask_padding_frames = True
        assert torch.isfinite(micro.score(text, video)).all()
    micro.mask_padding_words = micro.mask_padding_frames = False


def test_frame_and_word_counts_are_fixed_by_the_mixing_matrices(micro):
    frames, mask, tokens = _inputs()
    with pytest.raises(ValueError, match="num_frames=4"):
        micro.encode_video(frames[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="max_words=32"):
        micro.encode_text(tokens[:, :20])
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
    with pytest.raises(ValueError, match="num_frames=4"):
        micro.score(text, video.replace(frames=video.frames[:, :3], frame_mask=video.frame_mask[:, :3]))
    with pytest.raises(ValueError, match="num_frames=99"):
        XCLIP(backbone="vtr-micro", num_frames=99)


def test_fit_and_test_run(trainer_kwargs):
    model = XCLIP(backbone="vtr-tiny", num_frames=4)
    module = RetrievalModule(model, eval_chunk_size=3)
    data = FakeVideoText(num_frames=4)
    trainer = L.Trainer(**trainer_kwargs, max_steps=2)
    trainer.fit(module, data)
    results = trainer.test(module, data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert results["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert results["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
