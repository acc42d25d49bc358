"""GLCCL (Jing et al. 2025): parameters, GLIM + X-CLIP head vs the official formulas, CSC, chunking, training."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.glccl import GLCCL, contrastive_score_consistency
from baselines.xclip import AttentionOverSimilarityMatrix
from retrieval.training import RetrievalModule


@pytest.fixture(scope="module")
def vitb32():
    return GLCCL(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = GLCCL(backbone="vtr-micro", num_frames=4).double().eval()
    with torch.no_grad():  # trained-like mixing matrices
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(n_videos=7, n_texts=5, t=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(n_videos, t, size, g, torch.float64, padded=1)
    return frames, mask, random_tokens(n_texts, 32, g)


def test_new_parameters_at_vit_b32(vitb32):
    # seqTransf 12,648,960 + A_g, A_l 2 x 512^2 + six 32x32 AOSM matrices; methods.md ~13.18 M
    # (the official extra, unused visual_logit_weight 12x12 is left out). Exact:
    assert sum(p.numel() for p in vitb32.new_parameters()) == 13_179_392


def test_head_is_xclip_with_word_guided_frames(vitb32):
    head = vitb32.head
    assert torch.equal(head.global_mat_weight, torch.eye(512)) and torch.equal(head.local_mat_weight, torch.eye(512))
    for m in head.modules():
        if isinstance(m, AttentionOverSimilarityMatrix):
            assert torch.equal(m.weight, torch.eye(32))  # every axis is a word axis (L x L)
    assert vitb32.csc_weight == 0.5 and vitb32.guidance_temperature == 5.0


def _official_components(model, text, video, tokens):
    """modeling_glccl.py with the pooled features materialised (einsum in place of its word loop)."""
    s, w = model.clip.encode_text(tokens)
    v = video.frames  # seqTransf output [N, T, D]
    b = (torch.einsum("qd,ntd->qnt", s, v) / 5).softmax(-1)
    video_output = F.normalize(torch.einsum("qnt,ntd->qnd", b, v), dim=-1)  # [Q, N, D]
    a = (torch.einsum("qld,ntd->qnlt", w, v) / 5).softmax(-1)
    frame_features = F.normalize(torch.einsum("qnlt,ntd->qnld", a, v), dim=-1)  # [Q, N, L, D]
    sn, wn, h, sigma = F.normalize(s, dim=-1), F.normalize(w, dim=-1), model.head, model.logit_scale()
    vs = sigma * torch.einsum("qd,qnd->qn", sn @ h.global_mat_weight, video_output)
    m = torch.einsum("qnd,qld->qln", video_output, wn)
    vw = sigma * (m * ((m / 0.01).softmax(1).permute(0, 2, 1) @ h.video_word.weight).permute(0, 2, 1)).sum(1)
    n = torch.einsum("qd,qnjd->qnj", sn, frame_features)
    sf = sigma * (n * ((n / 0.01).softmax(-1) @ h.sentence_frame.weight)).sum(-1)
    fine = torch.einsum("qld,qnjd->qlnj", wn @ h.local_mat_weight, frame_features)
    word_level = (((fine / 0.01).softmax(1).permute(0, 2, 3, 1) @ h.word_level.weight).permute(0, 3, 1, 2) * fine).sum(1)
    frame_level = (((fine / 0.01).softmax(-1) @ h.frame_level.weight) * fine).sum(-1)
    s2f = (((word_level / 0.01).softmax(-1) @ h.sentence_to_frame.weight) * word_level).sum(-1)
    v2w = (((frame_level / 0.01).softmax(1).permute(0, 2, 1) @ h.video_to_word.weight).permute(0, 2, 1) * frame_level).sum(1)
    return torch.stack([vs, vw, sf, sigma * (s2f + v2w) / 2])


def test_scores_match_the_official_pooled_features(micro):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        got = micro.score_components(text, video)
        expected = _official_components(micro, text, video, tokens)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(micro.score(text, video), expected.mean(0))


def test_csc_by_hand():
    # two pairs (B = 2), four score matrices [4, 2, 2]
    scores = torch.tensor([
        [[1.0, 0.0], [4.0, 2.0]],
        [[2.0, 2.0], [0.0, 2.0]],
        [[3.0, 4.0], [4.0, 2.0]],
        [[4.0, 6.0], [0.0, 2.0]],
    ])
    # diag (0,0): var(1,2,3,4) = 5/3; (1,1): var(2,2,2,2) = 0; off-diag: var(0,2,4,6) = 20/3, var(4,0,4,0) = 16/3
    expected = ((5 / 3 + 0) / 2) / ((20 / 3 + 16 / 3) / 4)
    assert contrastive_score_consistency(scores).item() == pytest.approx(expected)


def test_csc_weight_options(micro):
    frames, mask, tokens = _inputs(n_videos=4, n_texts=4)
    batch = {"frames": frames, "frame_mask": mask, "tokens": tokens}
    with torch.no_grad():
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        raw = contrastive_score_consistency(micro.score_components(text, video))
        logits = micro.training_logits(text, video)
        assert micro.auxiliary_losses(batch, text, video, logits)["csc"].item() == pytest.approx(0.5 * raw.item())
        micro.csc_weight = 0.1  # the official code's default
        assert micro.auxiliary_losses(batch, text, video, logits)["csc"].item() == pytest.approx(0.1 * raw.item())
        micro.csc_weight = 0.0
        assert micro.auxiliary_losses(batch, text, video, logits) == {}
    micro.csc_weight = 0.5
    with pytest.raises(ValueError, match="csc_weight"):
        GLCCL(backbone="vtr-micro", csc_weight=-1.0)


def test_csc_reuses_the_components_the_loss_scored(micro, monkeypatch):
    frames, mask, tokens = _inputs(n_videos=4, n_texts=4)
    batch = {"frames": frames, "frame_mask": mask, "tokens": tokens}
    micro.train()
    try:
        torch.manual_seed(0)
        text, video = micro.encode_text(tokens), micro.encode_video(frames, mask)
        expected = micro.csc_weight * contrastive_score_consistency(micro.score_components(text, video))
        other = micro.encode_video(frames.flip(1), mask)
        expected_other = micro.csc_weight * contrastive_score_consistency(micro.score_components(text, other))
        module = RetrievalModule(micro)
        calls = []
        original = micro.score_components
        monkeypatch.setattr(micro, "score_components", lambda *a: calls.append(1) or original(*a))
        terms, logits = module.contrastive_losses(text, video)
        csc = micro.auxiliary_losses(batch, text, video, logits)["csc"]
        assert len(calls) == 1  # scored once for the loss and the CSC term
        assert set(terms) == {"contrastive"}  # the components reach the CSC term, they are no InfoNCE term
        torch.testing.assert_close(csc, expected)
        # other features are the other features' components, never a stale match
        _, logits = module.contrastive_losses(text, other)
        torch.testing.assert_close(micro.auxiliary_losses(batch, text, other, logits)["csc"], expected_other)
        assert len(calls) == 2
    finally:
        micro.eval()


def test_word_count_is_fixed_but_frame_count_is_free(micro):
    frames, mask, tokens = _inputs()
    with pytest.raises(ValueError, match="max_words=32"):
        micro.encode_text(tokens[:, :20])
    with torch.no_grad():  # GLIM pools any number of frames: the head never sees T
        scores = micro.score(micro.encode_text(tokens), micro.encode_video(frames[:, :3], mask[:, :3]))
    assert scores.shape == (5, 7)


def test_fit_and_test_run(trainer_kwargs):
    model = GLCCL(backbone="vtr-tiny", num_frames=4)
    module = RetrievalModule(model, eval_chunk_size=3)
    data = FakeVideoText(num_frames=4)
    trainer = L.Trainer(**trainer_kwargs, max_steps=2)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/csc"])
    results = trainer.test(module, data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert results["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert results["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
