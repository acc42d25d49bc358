"""X-Pool: Cross-Modal Language-Video Attention for Text-Video Retrieval (Gorti et al., CVPR 2022).

Official code: https://github.com/layer6ai-labs/xpool (``modules/transformer.py``,
``model/clip_transformer.py``, ``modules/metrics.py``).

The video is pooled *by the text*: a single-head cross-attention whose query is the caption and
whose keys and values are the frames, followed by LayerNorm, a residual linear layer and
LayerNorm. With t the EOT text feature and V the (un-normalised) CLIP frame features:

- ``t' = LN₁(t)``, ``V' = LN₁(V)`` (one LayerNorm shared by both modalities);
- ``a_t = softmax_f(⟨W_q t', W_k V'_f⟩ / √D)``, ``r = W_o Σ_f a_f W_v V'_f``;
- ``r' = LN₂(r)``, ``out = LN₃(r' + Dropout(W_lin r'))``;
- ``s(t, v) = σ · cos(t, out)``, σ the CLIP logit scale.

Every Linear (W_q, W_k, W_v, W_o, W_lin) starts at weight I and bias 0 (``_init_parameters``).

Offline, ``encode_video`` caches the keys ``W_k V'`` and the values with ``W_o`` already applied,
``W_o W_v V' + b_o``: because the attention weights sum to one, ``W_o Σ_f a_f u_f + b_o =
Σ_f a_f (W_o u_f + b_o)``, so folding W_o into the cached values is the same function, and it
removes a D×D product per (text, video) pair (methods.md §6.3). ``encode_text`` computes the
query ``W_q LN₁(t)`` once per query.

Training scores with the block as written (dropout on the residual branch): ``2·T·D + D²`` MACs
per pair. In eval there is no dropout, and the rest of the block is affine in the pooled value up
to two LayerNorm scalings, so vtr evaluates the same function rearranged
(:meth:`TextConditionedPooling.pooled_cosine`): LN₂'s and LN₃'s variances and the output's norm
are quadratic forms of the attention weights in per-video T×T Gram matrices, cached by
``encode_video`` with ``g_f = γ₃ ⊙ P((P u_f ⊙ γ₂)(I + W_lin)ᵀ)``. Per pair that leaves two
``T·D`` products (attention logits, ``⟨t̂, g_f⟩``) and ``3·T²`` for the forms: ≈ 12.8 k MACs at
ViT-B/32 against ≈ 274 k, with no ``[Q, N, D]`` tensor. Tests pin it to the literal block in
float64 and show its fp32 error is the literal fp32 block's.

Differences from the official code, on purpose:

- padded frames (vtr's short videos; X-Pool itself always samples 12) are hidden from the
  attention by the frame mask;
- only the single-head attention of the paper's recipe (``num_mha_heads 1``);
- vtr's tokenizer at ``max_words`` tokens instead of HF's ``CLIPTokenizer`` truncating at 77;
- torch's AdamW for X-Pool's copy of HF's (same update); ``decay_all`` reproduces its decay of
  every parameter, and vtr's warmup-cosine is HF's ``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever, frame_products


def identity_linear(dim: int) -> nn.Linear:
    """A D→D Linear with weight I and bias 0 (X-Pool's ``_init_parameters``)."""
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TextConditionedPooling(nn.Module):
    """X-Pool's cross-modal attention block (the official ``Transformer``).

    Args:
        dim: D.
        dropout: dropout on the residual linear branch (MSR-VTT 9k: 0.3).
    """

    def __init__(self, dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)  # LN₁, shared by text and frames
        self.q_proj, self.k_proj = identity_linear(dim), identity_linear(dim)  # W_q, W_k
        self.v_proj, self.out_proj = identity_linear(dim), identity_linear(dim)  # W_v, W_o
        self.layer_norm2 = nn.LayerNorm(dim)  # LN₂
        self.linear_proj = identity_linear(dim)  # W_lin
        self.dropout = nn.Dropout(dropout)
        self.layer_norm3 = nn.LayerNorm(dim)  # LN₃

    def query(self, text: Tensor) -> Tensor:
        """``W_q LN₁(t)``: ``[Q, D] -> [Q, D]``."""
        return self.q_proj(self.layer_norm1(text))

    def keys_values(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Text-independent keys ``W_k V'`` and values ``W_o W_v V'`` (W_o folded): ``[N, T, D]`` each."""
        normed = self.layer_norm1(frames)  # V' [N, T, D]
        return self.k_proj(normed), self.out_proj(self.v_proj(normed))

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, frame_mask: Tensor) -> Tensor:
        """Pool every video for every query, the block as written: ``[Q, D], [N, T, D] -> [Q, N, D]``."""
        logits = torch.einsum("qd,ntd->qnt", query, keys) / math.sqrt(query.shape[-1])  # [Q, N, T]
        attention = logits.masked_fill(~frame_mask, float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("qnt,ntd->qnd", attention, values)  # r [Q, N, D]
        pooled = self.layer_norm2(pooled)  # r'
        return self.layer_norm3(pooled + self.dropout(self.linear_proj(pooled)))  # [Q, N, D]

    # ------------------------------------------------------------------ eval: the same block, rearranged
    def _residual(self, x: Tensor, bias: bool) -> Tensor:
        """``x + W_lin x (+ b_lin)``: the residual linear branch without dropout."""
        return x + F.linear(x, self.linear_proj.weight, self.linear_proj.bias if bias else None)

    def _offsets(self) -> tuple[Tensor, Tensor]:
        """``e = P(β₂ + W_lin β₂ + b_lin)`` (the text-independent part of LN₃'s centred input) and ``γ₃ ⊙ e``."""
        c = self._residual(self.layer_norm2.bias, bias=True)
        e = c - c.mean()
        return e, self.layer_norm3.weight * e

    def text_terms(self, sentence: Tensor) -> Tensor:
        """The per-query constants of :meth:`pooled_cosine`: ``[Q, D] -> [Q, 6]``.

        Columns: ``⟨t̂, γ₃ ⊙ e⟩``, ``⟨t̂, β₃⟩``, then ``|e|²``, ``|γ₃ ⊙ e|²``, ``⟨γ₃ ⊙ e, β₃⟩``,
        ``|β₃|²`` (the same for every query).
        """
        e, gamma_e = self._offsets()
        beta3 = self.layer_norm3.bias
        shared = torch.stack([e @ e, gamma_e @ gamma_e, gamma_e @ beta3, beta3 @ beta3])
        return torch.cat([sentence @ torch.stack([gamma_e, beta3], dim=1), shared.expand(len(sentence), 4)], dim=1)

    def pooling_forms(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-video terms of the rearranged block (eval, no dropout): ``[N, T, D] -> ([N, T, D], [N, 3T+3, T])``.

        With ``u_f`` the values (W_o folded), ``P`` centring over D, ``z_f = (P u_f ⊙ γ₂)(I + W_lin)ᵀ``,
        ``w_f = P z_f`` and ``g_f = γ₃ ⊙ w_f``, returns ``g`` and the stacked forms
        ``[G_u; G_w; G_g; hᵀ; kᵀ; mᵀ]``: the Gram matrices of ``P u``, ``w`` and ``g`` and the
        vectors ``h_f = ⟨w_f, e⟩``, ``k_f = ⟨g_f, γ₃ ⊙ e⟩``, ``m_f = ⟨g_f, β₃⟩``.
        """
        e, gamma_e = self._offsets()
        centred = values - values.mean(dim=-1, keepdim=True)  # P u [N, T, D]
        w = self._residual(centred * self.layer_norm2.weight, bias=False)
        w = w - w.mean(dim=-1, keepdim=True)  # P z
        g = w * self.layer_norm3.weight
        grams = [a @ a.transpose(1, 2) for a in (centred, w, g)]  # 3 x [N, T, T]
        linear = torch.stack([w @ e, g @ gamma_e, g @ self.layer_norm3.bias], dim=1)  # [N, 3, T]
        return g, torch.cat([*grams, linear], dim=1)

    def pooled_cosine(self, query: Tensor, sentence: Tensor, text_terms: Tensor, keys: Tensor, g: Tensor,
                      forms: Tensor, frame_mask: Tensor) -> Tensor:
        """``cos(t, block(t, V))`` from :meth:`pooling_forms`, exactly the block in eval: ``[N, Q]``.

        Because the attention weights a sum to one, everything before LN₃ is ``Σ_f a_f z_f / σ₂ + c``
        with ``σ₂² = aᵀG_u a / D + ε``, so LN₃'s variance, the dot product with t̂ and the output's
        norm are a ``[T]`` product with ``⟨t̂, g_f⟩`` plus quadratic and linear forms in a. Per pair
        that is ``2·T·D + 3·T²`` MACs instead of ``D² + 2·T·D``, and no ``[Q, N, D]`` tensor.

        Args:
            query: ``W_q LN₁(t)`` ``[Q, D]``.
            sentence: t̂, the unit text feature ``[Q, D]``.
            text_terms: :meth:`text_terms` of t̂ ``[Q, 6]``.
            keys, g, forms, frame_mask: the cached ``[N, T, D]``, ``[N, T, D]``, ``[N, 3T+3, T]``, ``[N, T]``.
        """
        n, t, d = keys.shape
        logits = frame_products(keys, query) / math.sqrt(d)  # [N, T, Q]
        a = logits.masked_fill(~frame_mask[..., None], float("-inf")).softmax(dim=1)
        text_g = frame_products(g, sentence)  # ⟨t̂, g_f⟩ [N, T, Q]
        forms_a = forms @ a  # [N, 3T+3, Q]
        quad_u, quad_w, quad_g = torch.linalg.vecdot(forms_a[:, : 3 * t].view(n, 3, t, -1), a[:, None], dim=2).unbind(1)
        lin_h, lin_k, lin_m = forms_a[:, 3 * t :].unbind(1)  # aᵀh, aᵀk, aᵀm [N, Q]
        t_gamma_e, t_beta3, e_sq, gamma_e_sq, gamma_e_beta3, beta3_sq = text_terms.T  # [Q] each
        sigma2 = (quad_u / d + self.layer_norm2.eps).sqrt()
        sigma3 = ((quad_w / sigma2 + 2 * lin_h) / sigma2 + e_sq).div(d).add(self.layer_norm3.eps).sqrt()
        dot = (torch.linalg.vecdot(a, text_g, dim=1) / sigma2 + t_gamma_e) / sigma3 + t_beta3
        scaled_sq = (quad_g / sigma2 + 2 * lin_k) / sigma2 + gamma_e_sq  # |P x ⊙ γ₃|²
        norm_sq = (scaled_sq / sigma3 + 2 * (lin_m / sigma2 + gamma_e_beta3)) / sigma3 + beta3_sq
        return dot / norm_sq.sqrt().clamp_min(1e-12)


class XPool(Retriever):
    """X-Pool: text-conditioned pooling of CLIP frame features.

    Args:
        dropout: dropout of the residual linear branch (0.3 for MSR-VTT 9k and LSMDC, 0.4 for
            MSR-VTT 7k and MSVD).

    Memory: an eval ``score`` call over Q queries and a chunk of N videos holds about ``5 · Q·N·T``
    floats (logits, attention, ``⟨t̂, g⟩``) plus ``(3T + 3) · Q·N`` for the forms: ≈ 0.4 MB per
    1,000 pairs at T=12, so the default budget of 16,384 pairs (256 videos for 64 queries) holds
    ≈ 6.5 MB. A training call holds ``≈ 5 · Q·N·D`` floats (the pooled value through the block),
    10 MB per 1,000 pairs at D=512. The eval cache is ``2·T·D + (3T+3)·T`` floats per video.
    """

    eval_chunk_size = 256
    eval_chunk_pairs = 16384
    eval_chunk_pairs_cuda = 65536  # measured on an H200 (Retriever.eval_chunk_pairs_cuda)

    def __init__(self, dropout: float = 0.3, **shared) -> None:
        super().__init__(**shared)
        self.pool_frames = TextConditionedPooling(self.clip.embed_dim, dropout)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # t [Q, D]
        unit = F.normalize(sentence, dim=-1)
        return TextFeatures(sentence=unit, query=self.pool_frames.query(sentence), terms=self.pool_frames.text_terms(unit))

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        """The frames' keys and values: what the block as written (with dropout) pools."""
        self.check_frames(frames, frame_mask)
        keys, values = self.pool_frames.keys_values(self.clip.encode_frames(frames))  # [B, T, D] each
        return VideoFeatures(frame_keys=keys, frame_values=values, frame_mask=frame_mask)

    def prepare_gallery(self, video: VideoFeatures) -> VideoFeatures:
        """The inference cache: the keys, ``g`` and the forms of
        :meth:`TextConditionedPooling.pooling_forms` in place of the values (same scores without
        dropout, 20× fewer MACs per pair)."""
        if "frame_values" not in video:
            return video
        g, forms = self.pool_frames.pooling_forms(video.frame_values)
        return VideoFeatures(frame_keys=video.frame_keys, frame_g=g, frame_forms=forms, frame_mask=video.frame_mask)

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``σ · cos(t, pool(V | t))``: ``[Q, N]`` logits."""
        if "frame_values" not in video:
            if self.training and self.pool_frames.dropout.p > 0:
                raise RuntimeError("X-Pool: these video features went through prepare_gallery (no values for the "
                                   "dropout branch); train on encode_video's output")
            cosine = self.pool_frames.pooled_cosine(text.query, text.sentence, text.terms, video.frame_keys,
                                                    video.frame_g, video.frame_forms, video.frame_mask)  # [N, Q]
            return self.logit_scale() * cosine.T
        pooled = self.pool_frames(text.query, video.frame_keys, video.frame_values, video.frame_mask[None])  # [Q, N, D]
        # cos(t, out) = ⟨t̂, out⟩ / max(|out|, ε), as F.normalize: no normalised copy of [Q, N, D]
        cosine = torch.linalg.vecdot(pooled, text.sentence[:, None]) / pooled.norm(dim=-1).clamp_min(1e-12)
        return self.logit_scale() * cosine
