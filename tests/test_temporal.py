"""CLIP4Clip's temporal transformer and the head blocks copied from CLIP's text tower, against the official code."""

from pathlib import Path

import official
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from retrieval.backbone import CLIPBackbone
from retrieval.recipes import build_retriever, read_recipe
from retrieval.temporal import TemporalTransformer

RECIPES = sorted((Path(__file__).resolve().parents[1] / "experiments" / "model").glob("*.yaml"))


@pytest.fixture(scope="module")
def seq_transf():
    """A seqTransf on QuickGELU blocks (the activation of OpenAI's weights), float64, trained-like parameters."""
    torch.manual_seed(0)
    temporal = TemporalTransformer(CLIPBackbone("vtr-micro", quick_gelu=True), num_layers=4).double().eval()
    with torch.no_grad():
        for p in temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return temporal


def _frames(b=3, t=5, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False  # videos of different lengths in one batch
    mask[2, -1] = False
    return frames, mask


@pytest.mark.parametrize("padded", [True, False])
def test_seqtransf_is_the_official_temporal_transformer(seq_transf, padded):
    """``frames + Transformer(frames + P)`` of modeling.py, eps 1e-12 blocks, residual included.

    At the open_clip blocks' eps 1e-5 the two differ by ~2.5e-6 relative; without the residual by O(1).
    """
    frames, mask = _frames()
    if not padded:
        mask[:] = True
    heads, positions = seq_transf.blocks[0].attn.num_heads, seq_transf.frame_position_embeddings.weight
    with torch.no_grad():
        got = seq_transf(frames, mask)
        expected = official.seq_transf(frames, mask, positions, seq_transf.blocks, heads)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_head_blocks_take_the_official_layer_norm_epsilon(recipe):
    """Blocks copied from CLIP's text tower take module_cross's eps 1e-12; CLIP's own blocks keep 1e-5.

    STAN's spatial modules are copies of CLIP *vision* blocks inside HuggingFace's CLIPEncoderLayer
    (``layer_norm_eps`` 1e-5), so they keep 1e-5.
    """
    model = build_retriever(read_recipe(recipe)["model"]["retriever"], {"backbone": "vtr-micro", "pretrained": None})
    blocks = {name: b for name, b in model.named_modules() if isinstance(b, ResidualAttentionBlock)}
    for name, block in blocks.items():
        eps = {m.eps for m in block.modules() if isinstance(m, nn.LayerNorm)}
        copied_text = not name.startswith("clip.") and not name.startswith("levels.")
        assert eps == ({1e-12} if copied_text else {1e-5}), name
    assert len(blocks) >= 8  # the two towers at least
