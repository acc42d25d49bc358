"""The shared loop: optimiser groups, schedule, training, evaluation, the retriever's record of
its arguments, and CLIP4Clip's invariants."""

import lightning as L
import pytest
import torch
from fakes import FakeVideoText

from baselines.clip2video import CLIP2Video
from baselines.clip4clip import MeanPool, SeqTransf, TightTransf
from baselines.glccl import GLCCL
from baselines.stan import STAN
from baselines.xclip import XCLIP
from baselines.xpool import XPool
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.metrics import retrieval_metrics
from retrieval.prompt_switch import PromptSwitch
from retrieval.recipes import build_retriever
from retrieval.training import LOGIT_SCALE_MAX, FreezeVisionTower, OptimConfig, RetrievalModule, warmup_cosine


def _video(t=4, b=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, size, size, generator=g), torch.ones(b, t, dtype=torch.bool)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def _eval_features(module, monkeypatch) -> dict:
    """Records what each evaluation gathered (the module releases its features after the epoch)."""
    seen = {}
    original = module.gather_eval_features

    def gather():
        seen["features"] = original()
        return seen["features"]

    monkeypatch.setattr(module, "gather_eval_features", gather)
    return seen


def test_parameter_groups(trainer_kwargs):
    model = SeqTransf(num_frames=4)
    module = RetrievalModule(model, optim=OptimConfig(lr=1e-3, clip_lr=1e-6, weight_decay=0.1))
    trainer = L.Trainer(**trainer_kwargs, max_steps=3)
    trainer.fit(module, FakeVideoText(num_frames=4))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"clip", "clip/no_decay", "new", "new/no_decay"}
    assert groups["clip"]["weight_decay"] == 0.1 and groups["clip/no_decay"]["weight_decay"] == 0.0
    by_id = {id(p): name for name, g in groups.items() for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_id[id(names["clip.logit_scale"])] == "clip/no_decay"
    assert by_id[id(names["clip.visual.class_embedding"])] == "clip/no_decay"
    assert by_id[id(names["clip.token_embedding.weight"])] == "clip/no_decay"
    assert by_id[id(names["clip.visual.ln_pre.weight"])] == "clip/no_decay"
    assert by_id[id(names["temporal.frame_position_embeddings.weight"])] == "new/no_decay"
    assert by_id[id(names["temporal.blocks.0.attn.in_proj_weight"])] == "new"
    assert by_id[id(names["clip.visual.conv1.weight"])] == "clip"
    assert {id(p) for p in model.new_parameters()} == {id(p) for p in groups["new"]["params"] + groups["new/no_decay"]["params"]}


def test_frozen_vision_tower_keeps_its_weights_and_the_rest_trains(trainer_kwargs):
    model = SeqTransf(backbone="vtr-micro", num_frames=4, max_words=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(**trainer_kwargs, max_steps=2, callbacks=[FreezeVisionTower()])
    trainer.fit(RetrievalModule(model), FakeVideoText(num_frames=4, size=32, max_words=16))
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        visual = name.startswith("clip.visual.")
        assert (id(p) in optimized) is not visual, name
        assert torch.equal(p, before[name]) is visual or name == "clip.logit_scale", name


def test_decay_all_puts_everything_in_decay_groups(trainer_kwargs):
    module = RetrievalModule(MeanPool(num_frames=4), optim=OptimConfig(decay_all=True))
    trainer = L.Trainer(**trainer_kwargs, max_steps=1)
    trainer.fit(module, FakeVideoText(num_frames=4))
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == {"clip"}


def test_logit_scale_is_clamped_after_each_step(trainer_kwargs):
    model = MeanPool(num_frames=4)
    with torch.no_grad():
        model.clip.logit_scale.fill_(6.0)
    L.Trainer(**trainer_kwargs, max_steps=1).fit(RetrievalModule(model), FakeVideoText(num_frames=4))
    # one step at clip_lr 1e-7 moves 6.0 by ~1e-7: only the clamp brings it down to log(100)
    assert model.clip.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX, abs=1e-6)
    with torch.no_grad():
        model.clip.logit_scale.fill_(6.0)  # between steps (e.g. a loaded checkpoint) the scale is clamped when read
    assert model.logit_scale().item() == pytest.approx(100.0)


def test_fit_and_test_evaluate_every_video_and_caption_once(trainer_kwargs, monkeypatch):
    dm = FakeVideoText(num_videos=7, num_frames=4, batch_size=3)
    model = SeqTransf(num_frames=4)
    module = RetrievalModule(model)
    trainer = L.Trainer(**trainer_kwargs, limit_train_batches=2)
    trainer.fit(module, dm)
    seen = _eval_features(module, monkeypatch)
    result = trainer.test(module, dm, verbose=False)[0]
    text, video, caption_video = seen["features"]
    assert module._eval_buffers == {"video": [], "text": []}  # released after the epoch
    assert len(video) == 7 and len(text) == len(dm.tokens)
    assert torch.equal(caption_video, dm.caption_video)
    expected = retrieval_metrics(model.similarity(text, video), caption_video)
    for key, value in expected.items():
        assert result[f"test/{key}"] == pytest.approx(value, abs=1e-4)


def test_evaluation_features_equal_direct_encoding(trainer_kwargs, monkeypatch):
    dm = FakeVideoText(num_videos=5, num_frames=4, batch_size=2)
    model = MeanPool(num_frames=4).eval()
    module = RetrievalModule(model)
    seen = _eval_features(module, monkeypatch)
    L.Trainer(**trainer_kwargs).test(module, dm, verbose=False)
    _, video, _ = seen["features"]
    with torch.no_grad():
        direct = model.encode_video(dm.frames, dm.frame_mask)
    torch.testing.assert_close(video.embedding, direct.embedding, rtol=1e-5, atol=1e-5)


def test_meanpool_is_order_blind_and_seqtransf_is_not():
    frames, mask = _video()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        mean = MeanPool(num_frames=4).eval()
        torch.testing.assert_close(
            mean.encode_video(frames, mask).embedding, mean.encode_video(frames[:, perm], mask).embedding, rtol=1e-5, atol=1e-6
        )
        seq = SeqTransf(num_frames=4).eval()
        a, b = seq.encode_video(frames, mask).embedding, seq.encode_video(frames[:, perm], mask).embedding
    assert (a - b).abs().max() > 1e-4


def test_padded_frames_do_not_change_meanpool():
    frames, mask = _video(t=4, b=1)
    model = MeanPool(num_frames=4).eval()
    padded_mask = mask.clone()
    padded_mask[0, 3] = False
    noisy = frames.clone()
    noisy[0, 3] = 5.0
    with torch.no_grad():
        a = model.encode_video(frames[:, :3], mask[:, :3]).embedding
        b = model.encode_video(noisy, padded_mask).embedding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MeanPool, SeqTransf])
def test_fusion_free_score_is_a_scaled_dot_product(cls):
    model = cls(num_frames=4).eval()
    assert cls.fusion_free
    frames, mask = _video()
    tokens = torch.randint(1, 49000, (5, 32))
    with torch.no_grad():
        video, text = model.encode_video(frames, mask), model.encode_text(tokens)
        scores = model.score(text, video)
    assert set(video) == {"embedding"}
    dot = text.embedding @ video.embedding.T
    c = scores.flatten() @ dot.flatten() / (dot.flatten() @ dot.flatten())
    assert c > 0
    torch.testing.assert_close(scores, c * dot, rtol=1e-5, atol=1e-5)


def test_bad_frames_are_clear_errors():
    model = MeanPool(num_frames=4)
    frames, mask = _video()
    with pytest.raises(ValueError, match="expects 64x64"):
        model.encode_video(frames[..., :32, :32], mask)
    with pytest.raises(ValueError, match="no valid frame"):
        model.encode_video(frames, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="frame_mask"):
        model.encode_video(frames, mask[:, :2])


def test_seqtransf_new_parameters_at_vit_b32():
    model = SeqTransf(backbone="ViT-B-32")
    # 4 CLIP text blocks (12 * 512^2 + 13 * 512 each) + 77 x 512 frame positions
    assert sum(p.numel() for p in model.new_parameters()) == 4 * (12 * 512 * 512 + 13 * 512) + 77 * 512 == 12_648_960
    for mine, clip in zip(model.temporal.blocks, model.clip.text_blocks[:4]):
        for (name, a), (_, b) in zip(mine.named_parameters(), clip.named_parameters()):
            assert torch.equal(a, b), name
    torch.testing.assert_close(model.temporal.frame_position_embeddings.weight, model.clip.positional_embedding)


def test_features_container():
    v = VideoFeatures(embedding=torch.randn(5, 3), frames=torch.randn(5, 2, 3))
    assert len(v) == 5 and len(v[1:3]) == 2 and v[4].frames.shape == (1, 2, 3)
    assert len(VideoFeatures.cat([v, v])) == 10
    assert [s for s, _ in v.chunks(2)] == [0, 2, 4]
    assert torch.equal(v.repeat_to(12).embedding[5], v.embedding[0])
    with pytest.raises(ValueError, match="leading dimension"):
        TextFeatures(sentence=torch.randn(4, 3), words=torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="clash"):
        VideoFeatures(values=torch.randn(2, 3))
    with pytest.raises(AttributeError, match="has no field 'words'"):
        TextFeatures(sentence=torch.randn(4, 3)).words


def test_retriever_config_records_its_arguments_and_the_activation_built():
    model = SeqTransf(num_temporal_layers=2, backbone="vtr-micro", num_frames=4, max_words=16)
    assert model.config == {
        "class_path": "baselines.clip4clip.SeqTransf",
        "init_args": {"backbone": "vtr-micro", "pretrained": None, "quick_gelu": False,  # None: the one built
                      "num_frames": 4, "max_words": 16, "num_temporal_layers": 2},
    }
    forced = XPool(dropout=0.1, backbone="vtr-micro", quick_gelu=True, num_frames=4)
    assert forced.config["init_args"] == {"backbone": "vtr-micro", "pretrained": None, "quick_gelu": True,
                                          "num_frames": 4, "max_words": 32, "dropout": 0.1}
    # a paper argument with its default, and the shared one a method names itself (Prompt Switch's num_frames)
    switch = PromptSwitch(backbone="vtr-micro", num_prompts=3, use_captioner=False).config["init_args"]
    assert (switch["num_frames"], switch["eval_num_frames"], switch["num_prompts"], switch["use_captioner"]) == (6, 12, 3, False)
    assert "shared" not in switch and "self" not in switch
    # plain data that rebuilds the same retriever, and what a RetrievalModule saves
    rebuilt = build_retriever(model.config)
    assert rebuilt.config == model.config and type(rebuilt) is SeqTransf
    assert RetrievalModule(model).hparams["retriever"] == model.config
    model.config["init_args"]["num_frames"] = 99  # a copy each time
    assert model.config["init_args"]["num_frames"] == 4


def test_a_checkpoint_loads_back_into_a_retrieval_module(trainer_kwargs, tmp_path):
    model = SeqTransf(num_temporal_layers=2, backbone="vtr-micro", num_frames=4, max_words=16)
    module = RetrievalModule(model, optim=OptimConfig(lr=1e-3), eval_chunk_size=5)
    trainer = L.Trainer(**trainer_kwargs, max_steps=1)
    trainer.fit(module, FakeVideoText(num_frames=4, size=32, max_words=16))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = RetrievalModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert type(loaded.retriever) is SeqTransf and loaded.retriever.config == model.config
    assert loaded.optim == OptimConfig(lr=1e-3) and loaded.retriever.eval_chunk_size == 5
    for (name, a), b in zip(model.state_dict().items(), loaded.retriever.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


RETRIEVERS = [MeanPool, SeqTransf, TightTransf, XCLIP, XPool, GLCCL, STAN, CLIP2Video, PromptSwitch]


@pytest.mark.parametrize("cls", RETRIEVERS, ids=lambda c: c.__name__)
def test_param_groups_hold_every_parameter_exactly_once(cls):
    kwargs = {"num_prompts": 3} if cls is PromptSwitch else {"num_frames": 4}
    model = cls(backbone="vtr-micro", **kwargs)
    groups = model.param_groups()
    assert set(groups) == {"clip", "new"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped))  # no parameter in two groups, nor twice in one
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.clip.parameters()} <= {id(p) for p in groups["clip"]}
    # the default groups are CLIP's vs new; only Prompt Switch moves a new module to the CLIP lr
    moved = {id(p) for p in groups["clip"]} - {id(p) for p in model.clip.parameters()}
    assert moved == ({id(p) for p in model.prompt_aggregation.parameters()} if cls is PromptSwitch else set())
