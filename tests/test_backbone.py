"""CLIPBackbone: open_clip loading (names, tags, local checkpoints) and the text/video pieces."""

import open_clip
import pytest
import torch

from retrieval.backbone import CLIPBackbone


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
