"""Prompt Switch's invariants: the cube and its switch, zero-init aggregation, chunking, the captioner."""

import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from fakes import FakeVideoText
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.datasets import collate_first_pair_per_video, first_pair_per_video
from retrieval.prompt_switch import PromptSwitch, caption_targets, prompt_switch_block, switch_prompts
from retrieval.recipes import read_recipe
from retrieval.training import OptimConfig, RetrievalModule

SOT, EOT = 49406, 49407
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECIPE = EXPERIMENTS / "model" / "prompt_switch.yaml"
OFFICIAL_OPTIM = OptimConfig(lr=1e-5, clip_lr=1e-6, weight_decay=0.2, decay_all=True, betas=(0.9, 0.999), eps=1e-6,
                             warmup_ratio=0.1)
"""The official recipe: HF AdamW (its defaults betas (0.9, 0.999), eps 1e-6), wd 0.2 on all parameters."""


def _video(b=2, t=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, size, size, generator=g), torch.ones(b, t, dtype=torch.bool)


@pytest.fixture(scope="module")
def vitb32():
    return PromptSwitch(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=12, num_prompts=3).eval()


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_vit_b32(vitb32):
    # methods.md: cube 27,648; aggregation MHA(768, 12) ≈ 2.36 M; captioner ≈ 33.8 M (25.3 M of it
    # the vocabulary head). Exact counts pinned; the rounded figures within their last digit.
    modules = (vitb32.prompt_cube, vitb32.prompt_aggregation, vitb32.captioner)
    cube, aggregation, captioner = (_count(m) for m in modules)
    assert cube == 27_648 == 6 * 6 * 768
    assert aggregation == 2_362_368 == 4 * 768 * 768 + 4 * 768  # q, k, v and out projections with biases
    assert captioner == 33_756_416 and abs(captioner - 33.8e6) < 0.1e6
    assert _count(vitb32.captioner.caption_head) == 512 * 49408 + 49408
    # every parameter that is not CLIP's is new, the aggregation included (it trains at the CLIP lr)
    assert sum(p.numel() for p in vitb32.new_parameters()) == cube + 2_362_368 + captioner
    assert vitb32.prompt_cube.prompts.std().item() == pytest.approx(768**-0.5 * 0.02, rel=0.05)  # ≈ 7.2e-4
    assert torch.equal(vitb32.captioner.caption_head.weight, vitb32.clip.token_embedding.weight)
    assert not vitb32.captioner.caption_head.bias.any()


@pytest.mark.parametrize("in_clip_group", [True, False])
def test_aggregation_lr_group_option(in_clip_group):
    model = PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=6, num_prompts=3,
                         aggregation_in_clip_group=in_clip_group)
    hook = {name: {id(p) for p in params} for name, params in model.param_groups().items()}
    assert all(id(p) in hook["clip" if in_clip_group else "new"] for p in model.prompt_aggregation.parameters())
    module = RetrievalModule(model, optim=read_recipe(RECIPE)["model"]["optim"])
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads of it
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    group_of = {id(p): name for name, g in groups.items() for p in g["params"]}
    aggregation = list(model.prompt_aggregation.parameters())
    assert len(aggregation) == 4 and {group_of[id(p)] for p in aggregation} == {"clip" if in_clip_group else "new"}
    assert (groups["clip"]["lr"], groups["new"]["lr"]) == (1e-6, 1e-5)
    assert {group_of[id(p)] for p in model.clip.parameters()} == {"clip"}
    assert group_of[id(model.prompt_cube.prompts)] == "new"
    new = {id(p) for p in model.new_parameters()}  # new whatever its lr
    assert all(id(p) in new for p in aggregation)


def test_recipe_yaml_parses():
    recipe = yaml.safe_load(RECIPE.read_text())
    parser = ArgumentParser()
    parser.add_class_arguments(RetrievalModule, "model")
    model = parser.parse_object({"model": recipe["model"]}).model
    args = model.retriever.init_args
    assert model.retriever.class_path == "retrieval.prompt_switch.PromptSwitch"
    assert (args.num_frames, args.eval_num_frames, args.num_prompts) == (6, 12, 6)
    assert OFFICIAL_OPTIM.__dict__ == vars(model.optim)
    assert recipe["seed_everything"] == 24 and recipe["trainer"] == {"max_epochs": 5, "gradient_clip_val": 1.0}
    assert recipe["data"] == {"drop_duplicate_videos": True, "frame_segments": 6, "frame_sampler": "prompt_switch",
                              "batch_size": 32}
    linked = read_recipe(RECIPE)["data"]  # as vtr fit links it, the DataModule's defaults filled in
    defaults = {name: p.default for name, p in inspect.signature(VideoTextDataModule).parameters.items()}
    assert linked == {**defaults, "num_frames": 6, "eval_num_frames": 12, "frame_segments": 6,
                      "frame_sampler": "prompt_switch", "max_words": 77, "batch_size": 32, "backbone": "ViT-B-32",
                      "drop_duplicate_videos": True}
    # a variant holds only its change, merged onto the recipe
    variant = read_recipe(RECIPE, EXPERIMENTS / "ablations" / "prompt_switch_aggregation_new_lr.yaml")
    assert variant["model"]["retriever"]["init_args"] == {**read_recipe(RECIPE)["model"]["retriever"]["init_args"],
                                                          "aggregation_in_clip_group": False}


def test_switch_reads_the_transposed_prompt():
    # 2 chunks x Np=3 frames, 2 visual tokens, width 1; prompt value 100c + 10f + p
    c, f, p = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(3), indexing="ij")
    prompts = (100 * c + 10 * f + p).reshape(6, 3, 1).float()
    visual = torch.randn(6, 2, 1)
    out = switch_prompts(torch.cat([visual, prompts], dim=1), 3)
    assert torch.equal(out[:, :2], visual)
    for chunk in range(2):
        for frame in range(3):
            for slot in range(3):  # frame f's slot p holds P[p, f]
                assert out[chunk * 3 + frame, 2 + slot, 0] == 100 * chunk + 10 * slot + frame


def test_prompt_slot_is_a_channel_from_frame_p_to_frame_f(micro):
    # one switched layer: the residual prompt P[0, 1] (frame 0, slot 1) reaches frame 1, not frame 2
    block = micro.clip.vision_blocks[0]
    x = torch.randn(3, 5 + 3, micro.clip.vision_width)
    y = x.clone()
    y[0, 5 + 1] += torch.randn(micro.clip.vision_width)  # not a constant: LayerNorm would hide it
    with torch.no_grad():
        a, b = prompt_switch_block(block, x, 3), prompt_switch_block(block, y, 3)
    changed = (a - b).abs().amax(dim=-1) > 1e-6  # [frames, tokens]
    assert changed[1, 0] and not changed[2].any()
    assert changed[0, 5 + 1] and not changed[0, 0]  # residual stays at P[0, 1]; frame 0 itself reads P[:, 0]


def test_aggregation_is_zero_initialised(micro):
    frames, _ = _video()
    with torch.no_grad():
        tokens = micro.prompted_tokens(frames)  # [B·T, S + Np, W]
        expected = micro.clip.project_cls(tokens[:, 0]).reshape(2, 6, -1)
        assert torch.allclose(micro.frame_features(frames), expected, atol=1e-6)


def _official_aggregation(cls, prompts, nf, attn):
    """float64 restatement of PromptSwitch model/prompt_clip.py ``CLIPVisionTransformer.forward``:
    ``q = cls.reshape(bs, nf, D)``, ``kv = prompts.reshape(bs, nf * Np, D)``, ``q + MHA(q, kv, kv)``."""
    n, d = cls.shape
    heads, bs = attn.num_heads, n // nf
    w_q, w_k, w_v = attn.in_proj_weight.double().split(d)
    b_q, b_k, b_v = attn.in_proj_bias.double().split(d)
    q, kv = cls.double().reshape(bs, nf, d), prompts.double().reshape(bs, -1, d)

    def split_heads(x):
        return x.reshape(bs, x.shape[1], heads, d // heads).transpose(1, 2)  # [bs, heads, len, d/h]

    query, key, value = split_heads(q @ w_q.T + b_q), split_heads(kv @ w_k.T + b_k), split_heads(kv @ w_v.T + b_v)
    weights = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (weights @ value).transpose(1, 2).reshape(bs, nf, d)
    out = out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    return (q + out).reshape(n, d)


def test_aggregation_groups_by_the_training_frame_count():
    # nf = 6 training frames, Np = 3: each frame attends over the 18 prompts of its 6-frame group
    # (two chunks), at evaluation too (12 frames = two groups), as the official code does
    torch.manual_seed(1)
    model = PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=12, num_prompts=3).eval()
    with torch.no_grad():  # a trained, non-zero output projection
        model.prompt_aggregation.attn.out_proj.weight.normal_(std=0.3)
        model.prompt_aggregation.attn.out_proj.bias.normal_(std=0.3)
        frames, _ = _video(t=12)
        tokens = model.prompted_tokens(frames)  # [24, S + 3, W]
        actual = model.frame_features(frames).reshape(24, -1)
        attn = model.prompt_aggregation.attn
        by_group = model.clip.project_cls(_official_aggregation(tokens[:, 0], tokens[:, -3:], 6, attn).float())
        by_chunk = model.clip.project_cls(_official_aggregation(tokens[:, 0], tokens[:, -3:], 3, attn).float())
    torch.testing.assert_close(actual, by_group, rtol=1e-5, atol=1e-5)
    assert (actual - by_chunk).abs().max() > 1e-2  # grouping by Np (chunks) gives other features


def test_chunks_are_independent():
    model = PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=12, num_prompts=6).eval()
    frames, mask = _video(t=12)  # 12 test frames = 2 chunks of Np=6
    changed = frames.clone()
    changed[:, 6:] = torch.randn_like(changed[:, 6:])
    with torch.no_grad():
        a, b = model.frame_features(frames), model.frame_features(changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    # padded frames still run, but stay out of the mean
    mask[:, -1] = False
    with torch.no_grad():
        pooled = model.encode_video(frames, mask).embedding
    assert torch.allclose(pooled, F.normalize(F.normalize(a[:, :-1], dim=-1).mean(1), dim=-1), atol=1e-6)


def test_caption_loss_hand_checked():
    # vocabulary of 6: pad 0, words 1-3, SOT 4, EOT 5 (largest id, as in CLIP's BPE)
    weight = torch.tensor([1.0, 1.0, 0.25, 1.0, 0.25, 0.25])
    tokens = torch.tensor([[4, 1, 2, 5, 0, 0], [4, 0, 5, 0, 0, 0]])  # second: a real token 0 ("!")
    logits = torch.randn(2, 5, 6)
    logp = logits.log_softmax(-1)
    kept = [(0, 0, 1), (0, 1, 2), (0, 2, 5), (1, 0, 0), (1, 1, 5)]  # (row, input position, target)
    keep, targets = caption_targets(tokens)
    # inputs from the first EOT on (EOT input, padding) are dropped
    assert keep.nonzero().tolist() == [[r, i] for r, i, _ in kept]
    assert targets.tolist() == [t for _, _, t in kept]
    w = torch.stack([weight[t] for _, _, t in kept])
    nll = torch.stack([-logp[r, i, t] for r, i, t in kept])
    expected = (w * nll).sum() / w.sum()
    loss = F.cross_entropy(logits[keep], targets, weight=weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_captioner_kept_logits_equal_the_full_sequence(micro):
    # causal decoder: cutting the sequence after the last kept position and running the head on
    # the kept positions only gives exactly the full sequence's logits there
    torch.manual_seed(0)
    tokens = torch.tensor([[SOT, 320, 1929, EOT, 0, 0, 0, 0], [SOT, 518, EOT, 0, 0, 0, 0, 0]])
    keep, _ = caption_targets(tokens)
    embeds = torch.randn(2, 7, micro.clip.embed_dim)
    frames, mask = torch.randn(2, 6, micro.clip.embed_dim), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    full = micro.captioner(embeds, frames, mask)  # [2, 7, V]
    kept = micro.captioner(embeds, frames, mask, keep)  # [K, V]
    assert kept.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(kept, full[keep], rtol=1e-5, atol=1e-5)


def test_frequent_word_weights(micro):
    weight = micro.captioner.class_weight
    frequent = [SOT, EOT, 518, 320, 269, 267]  # the, a, ".", ","
    assert (weight[frequent] == 0.25).all()
    assert weight[1929] == 1.0  # "dog"
    assert int((weight == 0.25).sum()) == 19


def test_captioner_reads_encode_video_frames(micro):
    micro.train()
    try:
        frames, mask = _video()
        video = micro.encode_video(frames, mask)
        assert set(video) == {"embedding", "frames"}
        with torch.no_grad():
            assert set(micro.eval().encode_video(frames, mask)) == {"embedding", "frames"}  # whatever the mode
        micro.train()
        tokens = torch.tensor([[SOT, 1929, 5586, EOT, 0], [SOT, 320, 1929, 269, EOT]])
        loss = micro.auxiliary_losses({"tokens": tokens, "frame_mask": mask}, None, video, {})["caption"]
        loss.backward()
        assert micro.prompt_cube.prompts.grad.abs().sum() > 0  # through the frames of encode_video
        assert micro.clip.token_embedding.weight.grad is None  # decoder inputs under no_grad
    finally:
        micro.zero_grad(set_to_none=True)
        micro.eval()


def test_fusion_free_honesty(micro):
    frames, mask = _video()
    tokens = torch.tensor([[SOT, 1929, EOT, 0], [SOT, 320, 5586, EOT], [SOT, 269, EOT, 0]])
    assert micro.fusion_free
    with torch.no_grad():
        video, text = micro.prepare_gallery(micro.encode_video(frames, mask)), micro.encode_text(tokens)
        assert list(video) == ["embedding"]  # the gallery keeps one vector per video
        scores = micro.score(text, video)
    assert torch.allclose(scores, micro.logit_scale() * text.embedding @ video.embedding.T)
    assert micro.logit_scale().item() == pytest.approx(1 / 0.07)  # CLIP's initial temperature, exp(log(1/0.07))


def test_duplicate_videos_dropped_keeping_the_first():
    batch = {"video_index": torch.tensor([3, 1, 3, 2, 1]), "caption_index": torch.arange(5)}
    out = first_pair_per_video(batch)
    assert out["video_index"].tolist() == [3, 1, 2] and out["caption_index"].tolist() == [0, 1, 3]
    # the data option's collate: the same batch from its items
    items = [{"video_index": v, "caption_index": c} for v, c in zip(batch["video_index"], batch["caption_index"])]
    collated = collate_first_pair_per_video(items)
    assert collated["video_index"].tolist() == [3, 1, 2] and collated["caption_index"].tolist() == [0, 1, 3]


def test_duplicate_video_drop_is_refused_under_ddp():
    data = VideoTextDataModule(drop_duplicate_videos=True)
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="drop_duplicate_videos"):
        data.setup("fit")


def test_clear_errors(micro):
    with pytest.raises(ValueError, match="num_frames=4.*num_prompts=3"):
        PromptSwitch(backbone="vtr-micro", num_frames=4, eval_num_frames=6, num_prompts=3)
    with pytest.raises(ValueError, match="eval_num_frames=8.*num_frames=6"):
        PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=8)
    with pytest.raises(ValueError, match="eval_num_frames=9.*num_frames=6"):  # a multiple of Np=3, not of nf
        PromptSwitch(backbone="vtr-micro", num_frames=6, eval_num_frames=9, num_prompts=3)
    with pytest.raises(ValueError, match="max_words"):
        PromptSwitch(backbone="vtr-micro", max_words=64)
    for t in (4, 9):
        frames, mask = _video(t=t)
        with pytest.raises(ValueError, match=f"{t} frames.*groups of num_frames=6"):
            micro.encode_video(frames, mask)


@pytest.mark.parametrize("use_captioner", [True, False])
def test_fit_and_test(trainer_kwargs, use_captioner):
    model = PromptSwitch(backbone="vtr-tiny", num_frames=6, eval_num_frames=6, num_prompts=3,
                         use_captioner=use_captioner)
    module = RetrievalModule(model, optim=read_recipe(RECIPE)["model"]["optim"])
    trainer = L.Trainer(**trainer_kwargs, max_steps=2)
    data = FakeVideoText(num_videos=6, num_frames=6, size=64, batch_size=4)
    pairs = data.train_dataloader().dataset  # the recipe's data.drop_duplicate_videos: the official collate
    data.train_dataloader = lambda: DataLoader(pairs, batch_size=4, drop_last=True,
                                               collate_fn=collate_first_pair_per_video)
    assert min(len(batch["tokens"]) for batch in data.train_dataloader()) < 4  # duplicates dropped
    trainer.fit(module, data)
    assert ("train/caption" in trainer.callback_metrics) == use_captioner
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    group_of = {id(p): name for name, g in groups.items() for p in g["params"]}
    assert group_of[id(model.prompt_aggregation.attn.in_proj_weight)] == "clip"  # official lr quirk
    assert group_of[id(model.prompt_cube.prompts)] == "new"
    assert set(groups) == {"clip", "new"}  # decay_all: weight decay on every parameter
    metrics = trainer.test(module, data, verbose=False)[0]
    # the logged metrics against ranks computed here from the three stages, in float64
    model.eval()
    with torch.no_grad():
        text, video = model.encode_text(data.tokens), model.encode_video(data.frames, data.frame_mask)
    similarity = text.embedding.double() @ video.embedding.double().T  # [Q, N]; a positive scale keeps ranks
    positive = similarity[torch.arange(len(similarity)), data.caption_video]
    ranks = 1 + (similarity > positive[:, None]).sum(1) + (similarity == positive[:, None]).sum(1) - 1
    assert metrics["test/t2v/R@1"] == pytest.approx(100 * (ranks == 1).double().mean().item())
    assert metrics["test/t2v/MnR"] == pytest.approx(ranks.double().mean().item())
