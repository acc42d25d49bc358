"""X-CLIP: End-to-End Multi-grained Contrastive Learning for Video-Text Retrieval (Ma et al., ACM MM 2022).

Official code: https://github.com/xuguohai/X-CLIP (``modules/modeling_xclip.py``, ``--loose_type
--sim_header seqTransf``). Not Microsoft's video-recognition X-CLIP.

X-CLIP contrasts four granularities and averages them:

- video–sentence ``S_vs = σ (ŝ A_g) v̂ᵀ`` with the video vector v̂ of CLIP4Clip seqTransf;
- video–word ``S_vw``: the similarities ⟨ŵ_ℓ, v̂⟩ aggregated over the words ℓ;
- sentence–frame ``S_sf``: ⟨ŝ, f̂_t⟩ aggregated over the frames t (raw CLIP frame features,
  ``use_original_clip_for_frame_features``);
- frame–word ``S_fw``: the matrix ``M = (Ŵ A_l) F̂ᵀ`` aggregated over words then frames and over
  frames then words, averaged;
- ``S = (S_vs + S_vw + S_sf + S_fw) / 4``, σ the CLIP logit scale.

Every aggregation is an Attention Over Similarity Matrix (AOSM): ``Σ_k s_k (softmax(s/τ) A)_k``
with τ = 0.01 and an identity-initialised mixing matrix A (T×T or L×L), so the trained model is
tied to ``num_frames`` and ``max_words``: other frame or token counts are refused with an error
naming the option.

The video side (v̂, F̂) never sees the text and is cached by ``encode_video``; the text side (ŝ,
Ŵ and their projections ŝA_g, ŴA_l) once per query by ``encode_text``; ``score`` does the
per-pair work, ≈ L·T·D + L·D + T·D + L²T + LT² MACs per (query, video) pair, gallery-major:
one ``[N·T, D] × [D, Q·(L + 1)]`` GEMM gives every frame–word and sentence–frame similarity of
the chunk (the frames are read once; 1/τ is folded into the text operand, so the frame–word
matrix arrives as logits), and the AOSMs run on its ``[N, T, Q, L]`` layout without permutes.

Differences from the official code, on purpose:

- padding tokens count as words (the official code has no word mask); ``mask_padding_words``
  removes them from every word softmax and sum. Padded frames likewise take part in the frame
  softmaxes by default (the official code masks only the video mean);
  ``mask_padding_frames`` removes them.
- the shared AdamW / no-decay rule / warmup-cosine of vtr (see ``baselines/clip4clip.py``)
  instead of BertAdam.

``AttentionOverSimilarityMatrix`` and ``MultiGrainedScores`` are reused by ``baselines/glccl.py``,
whose head is X-CLIP's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever, frame_products
from retrieval.temporal import TemporalTransformer, mean_pool_normalized

def check_length(actual: int, expected: int, option: str, what: str) -> None:
    """Refuse a frame or token count that differs from the size of the mixing matrices."""
    if actual != expected:
        raise ValueError(
            f"{what} has {actual} positions but the identity-initialised mixing matrices are "
            f"{expected}x{expected} ({option}={expected}); set {option} to match, or feed {expected}"
        )


class AttentionOverSimilarityMatrix(nn.Module):
    """AOSM over one axis of a similarity tensor: ``Σ_k s_k · (softmax(s / τ) A)_k``.

    Args:
        size: length n of the aggregated axis (T frames or L words); A is n×n, initialised to I.
        temperature: τ of the softmax.
    """

    def __init__(self, size: int, temperature: float = 0.01) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))  # A
        self.temperature = temperature

    def forward(self, sim: Tensor, dim: int = -1, mask: Tensor | None = None, prescaled: bool = False) -> Tensor:
        """Aggregate axis ``dim`` (length n) of ``sim`` away.

        Args:
            sim: similarities, any shape with n positions along ``dim``.
            dim: the aggregated axis; the others are batch axes.
            mask: None, or True on the positions to keep (broadcastable to ``sim``).
            prescaled: ``sim`` holds ``s / τ`` (the caller folded 1/τ into a matmul operand,
                saving a pass over a large tensor); the sum is scaled back by τ.
        """
        dim = dim % sim.dim()
        logits = sim if prescaled else sim * (1.0 / self.temperature)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(dim=dim)
        # re-mix the weights across positions: (weights A) along ``dim``, as one matmul
        if dim == sim.dim() - 1:
            weights = weights @ self.weight
        else:  # Aᵀ w over [., n, trailing] slabs; the expanded Aᵀ is a stride-0 view, not a copy
            slabs = weights.reshape(-1, weights.shape[dim], math.prod(weights.shape[dim + 1 :]))
            weights = torch.bmm(self.weight.T.expand(slabs.shape[0], -1, -1), slabs).view(weights.shape)
        if mask is not None:
            weights = weights * mask
        total = torch.linalg.vecdot(weights, sim, dim=dim)
        return total * self.temperature if prescaled else total


class MultiGrainedScores(nn.Module):
    """X-CLIP's four scores from the similarity tensors of Q queries and N videos.

    Holds A_g, A_l (D×D) and the six AOSM mixing matrices, all initialised to the identity.

    Args:
        num_frames: T, the frame axis of the sentence–frame and frame–word terms.
        num_words: L, the word axis.
        dim: D.
        temperature: τ of every AOSM softmax.
    """

    def __init__(self, num_frames: int, num_words: int, dim: int, temperature: float = 0.01) -> None:
        super().__init__()
        self.num_frames, self.num_words = num_frames, num_words
        self.temperature = temperature  # one τ for all six AOSMs (the frame-word logits are computed at it)
        self.global_mat_weight = nn.Parameter(torch.eye(dim))  # A_g
        self.local_mat_weight = nn.Parameter(torch.eye(dim))  # A_l
        self.video_word = AttentionOverSimilarityMatrix(num_words, temperature)  # A_w
        self.sentence_frame = AttentionOverSimilarityMatrix(num_frames, temperature)  # A_f
        self.word_level = AttentionOverSimilarityMatrix(num_words, temperature)  # A_wm
        self.frame_level = AttentionOverSimilarityMatrix(num_frames, temperature)  # A_fm
        self.sentence_to_frame = AttentionOverSimilarityMatrix(num_frames, temperature)  # A_fm2
        self.video_to_word = AttentionOverSimilarityMatrix(num_words, temperature)  # A_wm2

    def text_features(self, sentence: Tensor, words: Tensor, tokens: Tensor) -> TextFeatures:
        """Normalised ŝ, Ŵ and the query-side projections ŝA_g, ŴA_l / τ (computed once per query).

        ŴA_l is kept divided by τ: the frame–word similarities then come out of the caller's
        product as the AOSM logits, sparing a pass over the largest per-pair tensor.

        Args:
            sentence: ``[Q, D]`` EOT features.
            words: ``[Q, L, D]`` token features (padding positions included).
            tokens: ``[Q, L]`` ids; 0 marks padding.
        """
        check_length(tokens.shape[1], self.num_words, "max_words", "the caption tokens")
        sentence = F.normalize(sentence, dim=-1)  # ŝ [Q, D]
        words = F.normalize(words, dim=-1)  # Ŵ [Q, L, D]
        return TextFeatures(
            sentence=sentence,
            sentence_global=sentence @ self.global_mat_weight,  # ŝA_g [Q, D]
            words=words,
            words_local_logits=words @ self.local_mat_weight * (1.0 / self.temperature),  # ŴA_l / τ [Q, L, D]
            word_mask=tokens != 0,  # [Q, L]
        )

    def forward(
        self,
        video_sentence: Tensor,
        video_word: Tensor,
        sentence_frame: Tensor,
        frame_word_logits: Tensor,
        word_mask: Tensor | None = None,
        frame_mask: Tensor | None = None,
        frame_axis: int = 1,
    ) -> Tensor:
        """The four unscaled scores, stacked ``[4, Q, N]`` (S_vs, S_vw, S_sf, S_fw).

        Gallery-major layouts, the ones the callers' products leave: every softmax and sum runs
        over the last axis or over an axis whose trailing axes are contiguous, and no large
        tensor is permuted.

        Args:
            video_sentence: ``[N, Q]`` ⟨ŝA_g, v̂⟩.
            video_word: ``[N, Q, L]`` ⟨ŵ_ℓ, v̂⟩.
            sentence_frame: ``[N, Q, T]`` ⟨ŝ, f̂_t⟩.
            frame_word_logits: ⟨ŵ_ℓA_l, f̂_t⟩ / τ, ``[N, T, Q, L]`` (``frame_axis=1``, X-CLIP's
                ``[N·T, D] × [D, Q·L]`` product) or ``[N, Q, T, L]`` (``frame_axis=2``); the
                caller folds 1/τ into its text operand, and the two frame–word AOSMs share τ.
            word_mask: None, or ``[Q, L]`` True on the words to keep.
            frame_mask: None, or True on the frames to keep, broadcastable to ``[N, Q, T]``.
            frame_axis: where the frame axis of ``frame_word_logits`` is (1 or 2).
        """
        if frame_axis not in (1, 2):
            raise ValueError(f"frame_axis must be 1 ([N, T, Q, L]) or 2 ([N, Q, T, L]), got {frame_axis}")
        words = None if word_mask is None else word_mask[None]  # [1, Q, L]
        grid_frames = None  # the frame mask on the frame-word grid, [.., 1]
        if frame_mask is not None:
            grid_frames = (frame_mask.transpose(-1, -2) if frame_axis == 1 else frame_mask)[..., None]
        fine = frame_word_logits
        per_frame = self.word_level(fine, -1, None if words is None else words.unsqueeze(frame_axis), prescaled=True)
        per_word = self.frame_level(fine, frame_axis, grid_frames, prescaled=True)  # [N, Q, L]
        if frame_axis == 1:  # per_frame [N, T, Q]
            to_sentence = self.sentence_to_frame(per_frame, 1, None if grid_frames is None else grid_frames[..., 0])
        else:  # per_frame [N, Q, T]
            to_sentence = self.sentence_to_frame(per_frame, -1, frame_mask)
        fine_score = 0.5 * (to_sentence + self.video_to_word(per_word, -1, words))
        scores = torch.stack([
            video_sentence,
            self.video_word(video_word, -1, words),
            self.sentence_frame(sentence_frame, -1, frame_mask),
            fine_score,
        ])  # [4, N, Q]
        return scores.transpose(1, 2)


class XCLIP(Retriever):
    """X-CLIP with the seqTransf video encoder.

    Args:
        num_temporal_layers: depth of the seqTransf temporal transformer (4, CLIP text blocks 0-3).
        temperature: τ of the AOSM softmaxes (0.01).
        mask_padding_words: drop padding tokens from the word aggregations (official: kept).
        mask_padding_frames: drop padded frames from the frame aggregations (official: kept).

    Memory: a ``score`` call over Q queries and a chunk of N videos holds about
    ``4 · Q·N_chunk·L·T · 4`` bytes (the frame–word matrix and its softmax / mixed copies, fp32),
    plus ``O(Q·N_chunk·(L + T))``; ≈ 6 MB per 1,000 pairs at T=12, L=32. Chunks hold
    ``eval_chunk_size`` videos for one query and ``eval_chunk_pairs`` pairs for a batch (3,072:
    48 videos for 64 queries, ≈ 18 MB, the fastest of 16-128 videos at ViT-B/32 shapes on the
    project's CPU; GLCCL, whose per-pair tensors are 4× larger, is fastest at 1,024).
    """

    eval_chunk_size = 512
    eval_chunk_pairs = 3072
    eval_chunk_pairs_cuda = 65536  # measured on an H200 (Retriever.eval_chunk_pairs_cuda)

    def __init__(self, num_temporal_layers: int = 4, temperature: float = 0.01, mask_padding_words: bool = False,
                 mask_padding_frames: bool = False, **shared) -> None:
        super().__init__(**shared)
        self.temporal = TemporalTransformer(self.clip, num_temporal_layers)
        positions = self.temporal.frame_position_embeddings.num_embeddings
        if not 1 <= self.num_frames <= positions:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, {positions}] (the frame positions of "
                             f"{self.clip.name!r})")
        self.head = MultiGrainedScores(self.num_frames, self.max_words, self.clip.embed_dim, temperature)
        self.mask_padding_words = mask_padding_words
        self.mask_padding_frames = mask_padding_frames

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, words = self.clip.encode_text(tokens)  # [Q, D], [Q, L, D]
        text = self.head.text_features(sentence, words, tokens)
        # The text operand of the frame product, built once per query, not per gallery chunk.
        return text.replace(frame_operand=torch.cat([text.words_local_logits, text.sentence[:, None]], dim=1))  # [Q, L + 1, D]

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        check_length(frames.shape[1], self.num_frames, "num_frames", "the video")
        clip_frames = self.clip.encode_frames(frames)  # [B, T, D]
        video = mean_pool_normalized(self.temporal(clip_frames, frame_mask), frame_mask)  # v̂ [B, D]
        return VideoFeatures(embedding=video, frames=F.normalize(clip_frames, dim=-1), frame_mask=frame_mask)

    def score_components(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """The four logit-scaled scores ``[4, Q, N]`` (S_vs, S_vw, S_sf, S_fw)."""
        check_length(video.frames.shape[1], self.num_frames, "num_frames", "the video features")
        check_length(text.words.shape[1], self.max_words, "max_words", "the text features")
        frames = video.frames  # [N, T, D]
        n, t, d = frames.shape
        q, l = text.words.shape[:2]
        # Gallery on the left: one [N·T, D] x [D, Q·(L + 1)] product reads the frames once, runs
        # at GEMM speed and leaves the frame-word logits as [N, T, Q, L] (no permutes).
        dots = frame_products(frames, text.frame_operand.reshape(q * (l + 1), d)).view(n, t, q, l + 1)
        frame_word_logits = dots[..., :l].contiguous()  # ⟨ŵ_ℓA_l, f̂_t⟩ / τ [N, T, Q, L]
        sentence_frame = dots[..., l].transpose(1, 2)  # ⟨ŝ, f̂_t⟩ [N, Q, T]
        video_word = (video.embedding @ text.words.reshape(q * l, d).T).view(n, q, l)
        video_sentence = video.embedding @ text.sentence_global.T  # [N, Q]
        word_mask = text.word_mask if self.mask_padding_words else None  # [Q, L]
        frame_mask = video.frame_mask[:, None] if self.mask_padding_frames else None  # [N, 1, T]
        scores = self.head(video_sentence, video_word, sentence_frame, frame_word_logits, word_mask, frame_mask)
        return self.logit_scale() * scores

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``S = (S_vs + S_vw + S_sf + S_fw) / 4``: ``[Q, N]`` logits."""
        return self.score_components(text, video).mean(dim=0)
