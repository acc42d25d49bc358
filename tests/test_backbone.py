"""CLIPBackbone: open_clip loading (names, tags, local checkpoints, the activation) and the text/video pieces."""

import warnings
from pathlib import Path

import open_clip
import open_clip.factory
import pytest
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from retrieval.backbone import CLIPBackbone, weights_quick_gelu
from retrieval.recipes import build_retriever, read_recipe
from retrieval.training import RetrievalModule

RECIPES = sorted((Path(__file__).resolve().parents[1] / "experiments" / "model").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIPBackbone("vtr-tiny", max_words=32).eval()


def _tokens(texts, length=32):
    return open_clip.get_tokenizer("vtr-tiny", context_length=length)(texts)


def test_text_and_images_match_open_clip_at_full_context():
    clip = open_clip.create_model("vtr-tiny")
    backbone = CLIPBackbone("vtr-tiny")
    # copy the backbone's weights into the open_clip model and compare at L = context
    sd = clip.state_dict()
    for name, tensor in backbone.state_dict().items():
        key = {"text_transformer": "transformer"}.get(name.split(".")[0], name.split(".")[0])
        sd[".".join([key] + name.split(".")[1:])] = tensor
    clip.load_state_dict(sd)
    tokens = _tokens(["a red square moves left", "two circles"])
    sentence, words = backbone.eval().encode_text(tokens)
    assert words.shape == (2, 32, 64)
    torch.testing.assert_close(sentence, clip.eval().encode_text(tokens), rtol=1e-5, atol=1e-5)
    images = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(backbone.encode_images(images), clip.encode_image(images), rtol=1e-5, atol=1e-5)


def test_short_context_is_causal_and_sliced(tiny):
    tokens = _tokens(["a blue triangle"], 32)
    short = tokens[:, :16]
    s_full, w_full = tiny.encode_text(tokens)
    s_short, w_short = tiny.encode_text(short)
    # causal mask: the first 16 positions do not see the later padding
    torch.testing.assert_close(w_short, w_full[:, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_short, s_full, rtol=1e-5, atol=1e-5)


def test_frames_fold_batch_and_time(tiny):
    frames = torch.randn(2, 3, 3, 64, 64)
    out = tiny.encode_frames(frames)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out[1, 2], tiny.encode_images(frames[1, 2:3])[0], rtol=1e-5, atol=1e-5)


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    clip = open_clip.create_model("vtr-tiny")
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    loaded = CLIPBackbone("vtr-tiny", pretrained=str(path))
    torch.testing.assert_close(loaded.visual.proj, clip.visual.proj)
    torch.testing.assert_close(loaded.token_embedding.weight, clip.token_embedding.weight)
    torch.testing.assert_close(loaded.logit_scale, clip.logit_scale)


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        CLIPBackbone("no-such-model")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'"):
        CLIPBackbone("vtr-tiny", pretrained="nope")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CLIPBackbone("vtr-tiny", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="max_words=40"):
        CLIPBackbone("vtr-tiny", max_words=40)


def activations(module: nn.Module) -> dict[str, type]:
    """The MLP activation of every open_clip residual block in ``module`` (towers and copied head blocks)."""
    return {name: type(m.mlp.gelu) for name, m in module.named_modules() if isinstance(m, ResidualAttentionBlock)}


@pytest.fixture
def no_download(monkeypatch):
    """Stub open_clip's weight download and load (no file is fetched); record what would be loaded."""
    loaded = []
    stub = lambda cfg, **kw: f"stub:{cfg['hf_hub'] or cfg['url']}"  # noqa: E731
    monkeypatch.setattr(open_clip.factory, "download_pretrained", stub)
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda model, path, **kw: loaded.append(path) or {})
    return loaded


def test_the_activation_follows_the_weights():
    # open_clip's pretrained table: OpenAI, LAION-400M and MetaCLIP B/32 weights were trained with
    # QuickGELU, LAION-2B / DataComp ones with GELU; random init follows the model config
    assert weights_quick_gelu("ViT-B-32", "openai") is True
    assert weights_quick_gelu("ViT-B-32", "laion400m_e32") is True
    assert weights_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    assert weights_quick_gelu("ViT-B-32") is False
    assert weights_quick_gelu("ViT-B-32-quickgelu") is True
    assert weights_quick_gelu("ViT-B-32", quick_gelu=True) is True
    assert weights_quick_gelu("vtr-tiny") is False and weights_quick_gelu("vtr-micro") is False


def test_tiny_random_configs_keep_gelu(tiny):
    # vtr-tiny / vtr-micro JSON configs set no quick_gelu: nn.GELU, as the generated benchmark was run
    assert not tiny.quick_gelu
    acts = activations(tiny)
    assert len(acts) == 8 and set(acts.values()) == {nn.GELU}
    forced = CLIPBackbone("vtr-micro", quick_gelu=True)
    assert forced.quick_gelu and set(activations(forced).values()) == {QuickGELU}


def test_local_checkpoint_of_a_tiny_config_keeps_its_activation(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("vtr-tiny").state_dict(), path)
    assert set(activations(CLIPBackbone("vtr-tiny", pretrained=str(path))).values()) == {nn.GELU}
    assert set(activations(CLIPBackbone("vtr-tiny", str(path), quick_gelu=True)).values()) == {QuickGELU}


def test_contradictions_name_the_option(tmp_path, no_download):
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts the weights: 'ViT-B-32' 'openai'.*QuickGEL"):
        CLIPBackbone("ViT-B-32", "openai", quick_gelu=False)
    with pytest.raises(ValueError, match=r"quick_gelu=True contradicts the weights: 'ViT-B-32' 'laion2b_s34b_b79k'"):
        CLIPBackbone("ViT-B-32", "laion2b_s34b_b79k", quick_gelu=True)
    with pytest.raises(ValueError, match="quick_gelu=False contradicts the model config of 'ViT-B-32-quickgelu'"):
        CLIPBackbone("ViT-B-32-quickgelu", quick_gelu=False)
    assert no_download == []  # refused before any weights were fetched
    # a local ViT-B-32 file may hold QuickGELU (OpenAI) or GELU (LAION-2B) weights: it must be said
    path = tmp_path / "b32.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"set quick_gelu=True or False.*'ViT-B-32-quickgelu'"):
        weights_quick_gelu("ViT-B-32", str(path))
    assert weights_quick_gelu("ViT-B-32", str(path), quick_gelu=True) is True
    assert weights_quick_gelu("ViT-B-32-quickgelu", str(path)) is True


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_the_activation_of_its_weights(recipe, no_download):
    """With OpenAI's weights (download stubbed), both towers and every copied head block run QuickGELU."""
    init_args = read_recipe(recipe)["model"]["retriever"]["init_args"]
    assert (init_args["backbone"], init_args["pretrained"]) == ("ViT-B-32", "openai")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*QuickGELU mismatch")  # open_clip's warning must not fire
        model = build_retriever(read_recipe(recipe)["model"]["retriever"])
    assert no_download == ["stub:timm/vit_base_patch32_clip_224.openai/"]  # the tag's weights were loaded
    acts = activations(model)
    heads = [name for name in acts if not name.startswith("clip.")]
    assert len(acts) - len(heads) == 24  # 12 vision + 12 text blocks
    assert set(acts.values()) == {QuickGELU}, {n: a for n, a in acts.items() if a is not QuickGELU}
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    assert model.clip.quick_gelu


def test_a_rebuild_without_the_weights_keeps_their_activation(tmp_path):
    """``vtr index``/``vtr bench`` rebuild a recipe with ``pretrained=None`` and load a checkpoint
    over it: the activation must still be the one OpenAI's weights were trained with, and a
    checkpoint's hyperparameters carry the activation built."""
    recipe = read_recipe(RECIPES[0])["model"]["retriever"]
    model = build_retriever(recipe, {"pretrained": None, "num_frames": 2, "max_words": 8})
    assert model.clip.quick_gelu and set(activations(model).values()) == {QuickGELU}
    assert model.config["init_args"]["quick_gelu"] is True
    assert RetrievalModule(model).hparams["retriever"]["init_args"]["quick_gelu"] is True  # what a checkpoint saves
    # another backbone, or an explicit activation, is the user's choice and is kept
    assert not build_retriever(recipe, {"backbone": "vtr-micro", "pretrained": None}).clip.quick_gelu
    assert not build_retriever(recipe, {"pretrained": None, "quick_gelu": False}).clip.quick_gelu
