"""STAN: new parameters, CLIP-copied spatial layers, identity temporal modules, fixed temperature, summed loss."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeVideoText, random_tokens, random_videos, t2v_by_hand

from baselines.clip4clip import MeanPool
from baselines.stan import STAN
from retrieval.recipes import read_recipe
from retrieval.training import RetrievalModule

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "model" / "stan.yaml"


@pytest.fixture(scope="module")
def b32():
    torch.manual_seed(0)
    return STAN(backbone="ViT-B-32")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return STAN(backbone="vtr-tiny").eval()


def _batch(b=3, t=5, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, mask = random_videos(b, t, size, g, padded=2)
    return frames, mask, random_tokens(b, 32, g, lengths=[4 + 3 * i for i in range(b)])


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_new_parameter_count_at_vit_b32(b32):
    # methods.md: 4 spatial copies ~28.4M + 4 temporal modules ~11.8M + time embedding 49k = ~40.2M
    spatial = sum(_count(level.spatial) for level in b32.levels)
    temporal = sum(_count(level.temporal) for level in b32.levels)
    assert spatial == 4 * _count(b32.clip.vision_blocks[0]) == 28_351_488
    assert temporal == 4 * (2 * 768 + 4 * (768 * 768 + 768) + 768 * 768 + 768) == 11_817_984
    assert _count(b32.time_embedding) == 64 * 768
    total = sum(p.numel() for p in b32.new_parameters())
    assert total == spatial + temporal + 64 * 768 == 40_218_624
    assert abs(total - 40.2e6) / 40.2e6 < 0.001


def test_spatial_layers_copy_clip_layers_9_to_12_and_temporal_modules_start_as_identity(b32):
    assert b32.first_layer == 8
    for k, level in enumerate(b32.levels):
        clip_block = b32.clip.vision_blocks[8 + k].state_dict()
        copy = level.spatial.block.state_dict()
        assert all(torch.equal(copy[name], clip_block[name]) for name in clip_block)
        clip_weight = b32.clip.vision_blocks[8 + k].mlp.c_fc.weight
        assert level.spatial.block.mlp.c_fc.weight.data_ptr() != clip_weight.data_ptr()  # a copy, trained apart
        assert not level.temporal.fc.weight.any() and not level.temporal.fc.bias.any()
    patches = torch.randn(2, 3, 4, 768)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        torch.testing.assert_close(b32.levels[0].temporal(patches, mask), patches)
    assert [level.spatial.drop_path for level in b32.levels] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])


def test_fixed_temperature_and_dot_product_score(tiny):
    frames, mask, tokens = _batch()
    assert not tiny.clip.logit_scale.requires_grad  # unused: frozen so DDP sees no unused trainable parameter
    with torch.no_grad():
        video, text = tiny.encode_video(frames, mask), tiny.encode_text(tokens)
        assert list(video) == ["embedding"]
        torch.testing.assert_close(tiny.score(text, video), 100.0 * text.embedding @ video.embedding.T)
        learned = tiny.clip.logit_scale.clone()
        tiny.clip.logit_scale.fill_(0.0)  # CLIP's learned scale plays no part
        torch.testing.assert_close(tiny.score(text, video), 100.0 * text.embedding @ video.embedding.T)
        tiny.clip.logit_scale.copy_(learned)


def test_loss_sums_the_two_cross_entropies(tiny):
    frames, mask, tokens = _batch()
    with torch.no_grad():
        video, text = tiny.encode_video(frames, mask), tiny.encode_text(tokens)
        s = text.embedding @ video.embedding.T / 0.01
        targets = torch.arange(3)
        expected = F.cross_entropy(s, targets) + F.cross_entropy(s.T, targets)
        terms, _ = RetrievalModule(tiny).contrastive_losses(text, video)
        assert tiny.loss_weights == {"contrastive": 2.0}
        torch.testing.assert_close(terms["contrastive"], expected)


def test_frame_order_matters_unlike_mean_pooling(tiny):
    frames, mask, _ = _batch()
    mask[:] = True
    perm = torch.tensor([2, 4, 0, 1, 3])
    with torch.no_grad():
        a = tiny.encode_video(frames, mask).embedding
        b = tiny.encode_video(frames[:, perm], mask).embedding
        assert (a - b).abs().max() > 1e-4
        torch.manual_seed(0)
        meanp = MeanPool(backbone="vtr-tiny").eval()
        torch.testing.assert_close(meanp.encode_video(frames, mask).embedding,
                                   meanp.encode_video(frames[:, perm], mask).embedding)


def test_padded_frames_do_not_leak(tiny):
    frames, mask, _ = _batch()
    other = frames.clone()
    other[0, -2:] = torch.randn_like(other[0, -2:])
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_video(frames, mask).embedding, tiny.encode_video(other, mask).embedding)


def test_paper_projection_starts_equal_to_the_code(tiny):
    torch.manual_seed(1)
    projected = STAN(backbone="vtr-tiny", use_projection=True).eval()
    missing, unexpected = projected.load_state_dict(tiny.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("projections.") for name in missing) and len(missing) == 3
    frames, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(projected.encode_video(frames, mask).embedding,
                                   tiny.encode_video(frames, mask).embedding)


@pytest.mark.parametrize(("option", "value"), [("num_levels", 5), ("temperature", 0.0), ("num_frames", 65)])
def test_bad_config_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        STAN(backbone="vtr-micro", **{option: value})


def test_fit_and_test_smoke(trainer_kwargs):
    torch.manual_seed(0)
    model = STAN(backbone="vtr-tiny", num_frames=4)
    data = FakeVideoText(num_videos=7, num_frames=4, size=64, batch_size=4)
    module = RetrievalModule(model, optim=read_recipe(RECIPE)["model"]["optim"])  # the recipe's optimiser
    trainer = L.Trainer(**trainer_kwargs, gradient_clip_val=5.0)  # the config's clip
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    by_hand = t2v_by_hand(model, data)  # an evaluation loop that chunked, ordered or ranked wrongly differs
    assert metrics["test/t2v/R@1"] == pytest.approx(by_hand["t2v/R@1"])
    assert metrics["test/t2v/MnR"] == pytest.approx(by_hand["t2v/MnR"])
