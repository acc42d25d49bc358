# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The methods side by side
#
# Every method in vtr is a `Retriever` with the same three stages:
#
# 1. `encode_video(frames [B,T,3,H,W], frame_mask [B,T]) -> VideoFeatures`: offline, once per
#    video, never sees the text (`prepare_gallery` then keeps what evaluation needs);
# 2. `encode_text(tokens [Q,L]) -> TextFeatures`: online, once per query;
# 3. `score(text, video) -> [Q, N]` logits: online, over the gallery.
#
# A **fusion-free** method (`fusion_free = True`) stores one embedding per video and its score is
# a dot product; a **text-conditioned** one caches frame-level features and does per-pair work in
# `score`. This notebook pushes one small batch through every recipe in `experiments/model/`,
# built on the 64-wide random-init `vtr-micro` backbone (no download, seconds on a CPU), and
# prints what each stage returns, how many parameters the method adds to CLIP, and whether it is
# fusion-free. The feature field names mean the same thing in every method
# (`retrieval/features.py` has the table).
#
# Parameters come from environment variables: `VTR_NB_FRAMES` (T, even), `VTR_NB_VIDEOS` (B),
# `VTR_NB_WORDS` (L).

# %%
import os
import sys
from pathlib import Path

import torch

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments" / "model").is_dir())
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from retrieval.recipes import build_retriever, read_recipe, tokenize  # noqa: E402

FRAMES = int(os.environ.get("VTR_NB_FRAMES", "4"))
VIDEOS = int(os.environ.get("VTR_NB_VIDEOS", "2"))
WORDS = int(os.environ.get("VTR_NB_WORDS", "16"))
assert FRAMES % 2 == 0, "Prompt Switch's chunks here hold 2 frames: VTR_NB_FRAMES must be even"

MICRO = {"backbone": "vtr-micro", "pretrained": None, "num_frames": FRAMES, "max_words": WORDS}
SMALLER = {"prompt_switch": {"num_prompts": 2, "eval_num_frames": FRAMES}}  # recipe: 6 prompts, 12 test frames
CAPTIONS = ["a red square moves left", "a blue circle turns from blue to green", "a big yellow triangle"]

torch.manual_seed(0)
frames = torch.randn(VIDEOS, FRAMES, 3, 32, 32)  # vtr-micro takes 32x32 frames
frame_mask = torch.ones(VIDEOS, FRAMES, dtype=torch.bool)
recipes = {path.stem: path for path in sorted((ROOT / "experiments" / "model").glob("*.yaml"))}
print(f"{len(recipes)} recipes: {', '.join(recipes)}")
print(f"batch: {VIDEOS} videos x {FRAMES} frames, {len(CAPTIONS)} captions x {WORDS} tokens")


# %%
def shapes(features) -> str:
    return ", ".join(f"{name} {list(tensor.shape)}" for name, tensor in features.items())


rows = {}


@torch.no_grad()
def side_by_side(name: str) -> dict:
    """Build one recipe's retriever on vtr-micro, run its three stages, print what they return."""
    recipe = read_recipe(recipes[name])
    retriever = build_retriever(recipe["model"]["retriever"], {**MICRO, **SMALLER.get(name, {})})
    video = retriever.encode_video(frames, frame_mask)
    gallery = retriever.prepare_gallery(video)
    text = retriever.encode_text(tokenize(retriever, CAPTIONS))
    scores = retriever.score(text, gallery)
    assert scores.shape == (len(CAPTIONS), VIDEOS)
    if retriever.fusion_free:  # the whole online cost: one dot product per (query, video)
        torch.testing.assert_close(scores, retriever.logit_scale() * text.embedding @ gallery.embedding.T)
    new = sum(p.numel() for p in retriever.new_parameters())
    clip = sum(p.numel() for p in retriever.clip.parameters())
    cached = sum(t[0].numel() for t in gallery.values())
    row = {"class": type(retriever).__name__, "fusion_free": retriever.fusion_free, "new_params": new,
           "cached_per_video": cached, "score": list(scores.shape)}
    summary = " ".join(type(retriever).__doc__.split("\n\n")[0].split())  # the class docstring's first paragraph
    print(f"{row['class']} ({recipe['model']['retriever']['class_path']}): {summary}")
    print(f"  fusion-free:      {retriever.fusion_free}")
    print(f"  encode_video:     {shapes(video)}")
    if gallery is not video:
        print(f"  prepare_gallery:  {shapes(gallery)}")
    print(f"  encode_text:      {shapes(text)}")
    print(f"  score:            {list(scores.shape)}  (queries x videos)")
    print(f"  new parameters:   {new:,} (CLIP: {clip:,})")
    print(f"  cached per video: {cached:,} values")
    rows[name] = row
    return row


# %% [markdown]
# ## Fusion-free methods
#
# ### MeanPool (CLIP4Clip meanP)
# The video is the mean of its L2-normalised CLIP frame features: parameter-free (0 new
# parameters) and **order-blind**, since a mean does not change when the frames are permuted
# (`order_blind_failure.py` shows what that costs).

# %%
side_by_side("meanpool")

# %% [markdown]
# ### SeqTransf (CLIP4Clip seqTransf)
# A 4-layer temporal transformer over the frame features (initialised from CLIP's first 4 text
# blocks, frame positions from CLIP's text positional embedding), a residual to the frames, then
# meanP. Still one embedding per video.

# %%
side_by_side("seqtransf")

# %% [markdown]
# ### CLIP2Video
# Two text-independent video embeddings: a global one from the Temporal Difference Block
# (frame differences interleaved with the frames through the temporal transformer) and an
# aligned one from the Temporal Alignment Block (K centres shared by text and video tokens).
# The stored embedding is `[√w v_glob, √(1-w) v_TAB]` (width 2D), so one dot product gives
# `w S_glob + (1-w) S_TAB`.

# %%
side_by_side("clip2video")

# %% [markdown]
# ### STAN
# A Spatial-Temporal Auxiliary Network beside the last K CLIP vision layers: per patch
# position, self-attention across frames (zero-initialised output, so it starts as the
# identity), then a copy of the paired CLIP block run per frame with a video CLS. Scored
# `cos / τ` with a fixed τ = 0.01.

# %%
side_by_side("stan")

# %% [markdown]
# ### Prompt Switch
# A Prompt Cube inside the CLIP vision tower: each frame of a chunk carries prompt tokens, and
# in every layer the chunk's prompt block is transposed across (frame, slot), so every frame's
# CLS sees the whole chunk; a prompt-aggregation attention (output projection zero-initialised),
# then mean pooling. Most of its new parameters are the training-only captioner's vocabulary
# head (`prepare_gallery` keeps only the embedding). Shrunk here to 2 prompts per frame.

# %%
side_by_side("prompt_switch")

# %% [markdown]
# ## Text-conditioned methods
#
# ### X-CLIP
# Four granularities, averaged: video–sentence, video–word, sentence–frame and frame–word, each
# aggregated by an Attention Over Similarity Matrix. The video side (v̂ `embedding`, the raw
# frames) is cached; the per-pair work is in `score`.

# %%
side_by_side("xclip")

# %% [markdown]
# ### X-Pool
# The caption pools the frames: single-head cross-attention with the text as query and the
# frames as keys and values, LayerNorms and a residual linear layer. `prepare_gallery` folds
# what it can into the cache (`frame_g`, `frame_forms`), so the eval score is cheap per pair.

# %%
side_by_side("xpool")

# %% [markdown]
# ### GLCCL
# X-CLIP's four-score head fed with text-guided video features: the sentence and every word
# pool the seqTransf frames (parameter-free Global-Local Interaction Module); training adds the
# Contrastive Score Consistency loss across the four score matrices.

# %%
side_by_side("glccl")

# %% [markdown]
# ### tightTransf (CLIP4Clip)
# The fusion extreme: for every (text, video) pair a 4-layer cross transformer runs over the
# caption's EOT feature and the T frame features. Only the frames can be cached.

# %%
side_by_side("tighttransf")

# %% [markdown]
# ## Summary
# Any recipe not shown above (a method added later) runs here too.

# %%
for name in recipes:
    if name not in rows:
        side_by_side(name)
print(f"{'recipe':<14} {'class':<13} {'fusion-free':<12} {'new params':>11} {'cached/video':>13}")
for name, row in rows.items():
    print(f"{name:<14} {row['class']:<13} {row['fusion_free']!s:<12} {row['new_params']:>11,} "
          f"{row['cached_per_video']:>13,}")
assert set(rows) == set(recipes)
assert rows["meanpool"]["new_params"] == 0 and rows["meanpool"]["fusion_free"]
