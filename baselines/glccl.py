"""GLCCL: Global-Local Contrastive Consistency Learning for text-video retrieval (Jing, Yang, Yang, CAC 2025).

Official code: https://github.com/JingXiaolun/GLCCL (``modules/modeling_glccl.py``, README command
``--sim_header seqTransf --text_guided_flag --aggregation_weights_type softmax``).

GLCCL is X-CLIP's four-score head (``baselines/xclip.py``, imported from there rather than
copied: the head *is* X-CLIP's) fed with text-guided video features instead of text-agnostic
ones. With V the seqTransf frame features (un-normalised, ``[N, T, D]``), s the EOT feature and
w_ℓ the token features (un-normalised, padding included):

- Global-Local Interaction Module (GLIM, parameter-free): ``b = softmax_f(⟨s, V_f⟩ / 5)`` pools
  a sentence-guided video ``v_s = Σ_f b_f V_f``, and for every word position j
  ``a_j = softmax_f(⟨w_j, V_f⟩ / 5)`` pools a word-guided "frame" ``F_j = Σ_f a_jf V_f``;
- the X-CLIP scores on the normalised v̂_s (the video) and F̂ (the L "frames"):
  ``S_vs = σ⟨ŝA_g, v̂_s⟩``, ``S_vw`` over ⟨ŵ_ℓ, v̂_s⟩, ``S_sf`` over ⟨ŝ, F̂_j⟩, ``S_fw`` over
  ``⟨ŵ_ℓA_l, F̂_j⟩`` (every mixing matrix L×L), ``S`` their mean;
- Contrastive Score Consistency (CSC): with ``Var`` the unbiased variance across the four
  logit-scaled score matrices of the in-batch pairs, ``L_CSC = mean(diag Var) / (Σ_{i≠j} Var_ij
  / B²)`` (the code's ``var_loss``), added with weight λ.

How the pooled features are scored. The pooled vectors are never materialised: a pooled vector
is a convex combination of frames, so its dot product with any query-side vector is the same
combination of that vector's frame dot products, and its norm is ``√(aᵀ G a)`` with the frames'
Gram matrix ``G = V Vᵀ`` (``[T, T]`` per video, cached by ``encode_video``). The frame dot
products of s, ŝA_g, W and ŴA_l are one ``[N·T, D] × [D, Q·(2L + 2)]`` GEMM over the gallery
chunk (1/τ folded into ŴA_l, so the frame–word matrix arrives as logits); the rest is
``[L, T] × [T, L]`` per pair. This is the same function as the official code (a test checks it
against the literal pooled-feature formula) at ≈ 2·L·T·D + 2·T·D + L²·T + L·T² ≈ 0.42 M MACs per
pair instead of ≈ 0.96 M, and ``O(L² + L·T)`` floats per pair instead of ``O(L·D)``. The
official Python loop over word positions is one batched matmul here.

Differences from the official code, on purpose:

- λ = 0.5 by default (the README's ``--csc_loss_weight 0.5``); the code's flag
  ``--var_loss_weight`` defaults to 0.1, available as ``csc_weight=0.1``;
- CSC is computed per rank on the local B×B pairs (the official code computes it on the
  all-gathered global matrix), from the in-batch block of the components the contrastive
  loss scored;
- padding tokens are words by default, as in the official code; ``mask_padding_words`` drops
  them both as guides and as words; ``mask_padding_frames`` hides padded frames from GLIM
  (the official code does not mask them);
- the unused ``visual_logit_weight`` (12×12) of the official module is left out, and so are the
  ``softmax_linear_softmax`` / ``mlp_softmax`` aggregations (the latter is broken upstream);
- vtr's shared AdamW / no-decay rule / warmup-cosine instead of BertAdam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from baselines.xclip import MultiGrainedScores
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever, frame_products
from retrieval.temporal import TemporalTransformer


def guidance_weights(guide_dots: Tensor, temperature: float, frame_mask: Tensor | None) -> Tensor:
    """GLIM's pooling weights ``softmax_f(⟨q, V_f⟩ / temperature)`` over the frame axis (dim 1)."""
    logits = guide_dots / temperature
    if frame_mask is not None:
        logits = logits.masked_fill(~frame_mask, float("-inf"))
    return logits.softmax(dim=1)


def pooled_norm(weights: Tensor, gram: Tensor) -> Tensor:
    """``|Σ_f a_f V_f| = √(aᵀ G a)`` for weights ``[N, T, ...]`` and Gram matrices ``[N, T, T]`` -> ``[N, ...]``."""
    mixed = (gram @ weights.flatten(2)).view(weights.shape)  # G a, one [T, T] x [T, ·] product per video
    return torch.linalg.vecdot(mixed, weights, dim=1).clamp_min(1e-12).sqrt()


def contrastive_score_consistency(scores: Tensor) -> Tensor:
    """CSC: mean variance of the scores on positives over the mean on negatives.

    Args:
        scores: ``[K, B, B]`` the K logit-scaled score matrices of the in-batch pairs
            (positives on the diagonal).

    Returns:
        ``mean(diag Var) / (Σ_{i≠j} Var_ij / B²)`` with ``Var`` the unbiased variance over K.
    """
    variance = scores.var(dim=0)  # [B, B]
    positives = variance.diagonal()
    b = variance.shape[0]
    return positives.mean() / ((variance.sum() - positives.sum()) / b**2)


class GLCCL(Retriever):
    """GLCCL: text-guided pooling (GLIM) + X-CLIP's four-score head + the CSC loss.

    Args:
        num_temporal_layers: depth of the seqTransf temporal transformer (4).
        temperature: τ of the AOSM softmaxes (0.01).
        guidance_temperature: temperature of GLIM's pooling softmax (5).
        csc_weight: λ of the CSC loss (README 0.5; the code's default 0.1); 0 disables it.
        mask_padding_words: drop padding tokens as guides and as words (official: kept).
        mask_padding_frames: hide padded frames from GLIM (official: not hidden).

    Memory: a ``score`` call over Q queries and a chunk of N videos holds about
    ``(4·L·T + 5·L²) · Q·N · 4`` bytes (the word–frame dot products, GLIM weights, and the
    L×L frame–word matrix with its softmax / mixed copies, fp32); ≈ 26 MB per 1,000 pairs at
    T=12, L=32, independent of D. Chunks hold ``eval_chunk_size`` videos for one query and
    ``eval_chunk_pairs`` pairs for a batch.
    """

    eval_chunk_size = 512
    eval_chunk_pairs = 1024
    eval_chunk_pairs_cuda = 65536  # measured on an H200 (Retriever.eval_chunk_pairs_cuda)

    def __init__(self, num_temporal_layers: int = 4, temperature: float = 0.01, guidance_temperature: float = 5.0,
                 csc_weight: float = 0.5, mask_padding_words: bool = False, mask_padding_frames: bool = False,
                 **shared) -> None:
        super().__init__(**shared)
        if csc_weight < 0:
            raise ValueError(f"csc_weight must be >= 0, got {csc_weight}")
        self.temporal = TemporalTransformer(self.clip, num_temporal_layers)
        # The word-guided features take the place of frames: every mixing matrix is L×L.
        self.head = MultiGrainedScores(self.max_words, self.max_words, self.clip.embed_dim, temperature)
        self.guidance_temperature = guidance_temperature
        self.csc_weight = csc_weight
        self.mask_padding_words = mask_padding_words
        self.mask_padding_frames = mask_padding_frames

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, words = self.clip.encode_text(tokens)  # [Q, D], [Q, L, D]
        # GLIM guides with the raw features: keep their norms next to the normalised ones.
        text = self.head.text_features(sentence, words, tokens)
        # The text operand of the frame product, built once per query, not per gallery chunk.
        local = text.words_local_logits  # ŴA_l / τ
        operand = torch.cat([text.words, local, text.sentence[:, None], text.sentence_global[:, None]], dim=1)
        return text.replace(
            frame_operand=operand,  # [Q, 2L + 2, D]
            sentence_norm=sentence.norm(dim=-1),  # |s| [Q]
            word_norm=words.norm(dim=-1),  # |w_ℓ| [Q, L]
        )

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        v = self.temporal(self.clip.encode_frames(frames), frame_mask)  # V [B, T, D], un-normalised
        return VideoFeatures(frames=v, gram=torch.einsum("btd,bsd->bts", v, v), frame_mask=frame_mask)

    def score_components(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """The four logit-scaled scores ``[4, Q, N]`` (S_vs, S_vw, S_sf, S_fw)."""
        v = video.frames  # [N, T, D]
        n, t, d = v.shape
        q, l = text.words.shape[:2]
        # Every frame dot product in one [N·T, D] x [D, Q·(2L + 2)] product (the gallery is read
        # once): ⟨ŵ_ℓ, V_f⟩, ⟨ŵ_ℓA_l, V_f⟩ / τ, ⟨ŝ, V_f⟩, ⟨ŝA_g, V_f⟩, as [N, T, Q, ·] views.
        dots = frame_products(v, text.frame_operand.reshape(q * (2 * l + 2), d)).view(n, t, q, 2 * l + 2)
        word_dots = dots[..., :l]  # ⟨ŵ_ℓ, V_f⟩ [N, T, Q, L]
        local_logits = dots[..., l : 2 * l]  # ⟨ŵ_ℓA_l, V_f⟩ / τ
        sentence_dots = dots[..., 2 * l]  # ⟨ŝ, V_f⟩ [N, T, Q]
        global_dots = dots[..., 2 * l + 1]  # ⟨ŝA_g, V_f⟩

        # GLIM over the frame axis (dim 1): sentence-guided b [N, T, Q], word-guided a [N, T, Q, L(j)]
        frame_keep = video.frame_mask[:, :, None] if self.mask_padding_frames else None  # [N, T, 1]
        b = guidance_weights(sentence_dots * text.sentence_norm, self.guidance_temperature, frame_keep)
        a = guidance_weights(word_dots * text.word_norm, self.guidance_temperature,
                             None if frame_keep is None else frame_keep[..., None])
        video_norm = pooled_norm(b, video.gram)  # |v_s| [N, Q]
        a_unit = a / pooled_norm(a, video.gram)[:, None]  # a_j / |F_j|: F̂_j = Σ_f (a_j / |F_j|)_f V_f

        # dot products with the normalised pooled features v̂_s and F̂_j
        video_sentence = torch.linalg.vecdot(b, global_dots, dim=1) / video_norm  # [N, Q]
        video_word = torch.linalg.vecdot(word_dots, b[..., None], dim=1) / video_norm[..., None]  # [N, Q, L]
        sentence_frame = torch.linalg.vecdot(a_unit, sentence_dots[..., None], dim=1)  # [N, Q, L(j)]
        # ⟨ŵ_ℓA_l, F̂_j⟩ / τ: one [L(j), T] x [T, L] product per (video, query), [N, Q, L(j), L]
        frame_word_logits = a_unit.permute(0, 2, 3, 1) @ local_logits.transpose(1, 2)

        word_keep = text.word_mask if self.mask_padding_words else None  # [Q, L]
        guides = None if word_keep is None else word_keep[None]  # [1, Q, L(j)]
        scores = self.head(video_sentence, video_word, sentence_frame, frame_word_logits, word_keep, guides, frame_axis=2)
        return self.logit_scale() * scores

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``S = (S_vs + S_vw + S_sf + S_fw) / 4``: ``[Q, N]`` logits."""
        return self.score_components(text, video).mean(dim=0)

    def training_logits(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """``S`` for the loss, and its four components ``[4, Q, N]`` for the CSC term."""
        components = self.score_components(text, video)
        return {"contrastive": components.mean(dim=0), "components": components}

    def auxiliary_losses(self, batch: dict[str, Tensor], text: TextFeatures, video: VideoFeatures,
                         logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"csc": λ · L_CSC}`` on this rank's B×B in-batch pairs, from the components the
        contrastive loss has just scored (not recomputed)."""
        if self.csc_weight == 0:
            return {}
        return {"csc": self.csc_weight * contrastive_score_consistency(logits["components"])}
