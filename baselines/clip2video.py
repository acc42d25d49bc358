"""CLIP2Video: Mastering Video-Text Retrieval via Image CLIP (Fang, Xiong, Xu, Chen; arXiv 2106.11097).

Official code: https://github.com/CryhanFang/CLIP2Video (``modules/modeling.py``), released best
configuration ``--sim_type seqTransf --temporal_type TDB --temporal_proj sigmoid_selfA
--center_type TAB --center_proj TAB_TDB --centerK 5 --center_weight 0.5``. Both CLIP encoders are
fine-tuned; on top of the per-frame CLIP features ``f_t`` two text-independent video embeddings:

- global branch, Temporal Difference Block (TDB): the differences ``d_t = f_{t+1} - f_t`` go
  through a 1-layer attention and ``2 sigma(LN(.)) - 1``, are interleaved with the frames
  (``f_1, d_1, f_2, ..., d_{T-1}, f_T``; ``d_t`` shares ``f_t``'s position, a type embedding
  tells the two apart) and run through CLIP4Clip's 4-layer temporal transformer; the frame
  outputs plus a residual are mean-pooled as meanP;
- aligned branch, Temporal Alignment Block (TAB): ``K`` centres shared by both modalities
  (NetVLAD-like soft assignment, per-centre residuals L2-normalised and averaged). Video tokens:
  the T frames plus the ``ceil(T/2)`` large-rate frames (every other frame) enhanced by the same
  TDB and a 1-layer ``actionClip`` transformer; text tokens: every token feature, SOT and
  padding masked out (EOT kept).

The score is ``S = w S_glob + (1 - w) S_TAB`` with ``w = 0.5``. Both video embeddings are
text-independent, so the method is fusion-free and one dot product scores it: the video
embedding is ``[sqrt(w) v_glob, sqrt(1-w) v_TAB]`` and the text one ``[sqrt(w) t_glob,
sqrt(1-w) t_TAB]``, whose dot product is exactly ``w cos_glob + (1-w) cos_TAB`` (a query costs
2 D per video). Training uses the official loss, ``w CE_sym(S_glob) + (1-w) CE_sym(S_TAB)``
(not ``CE_sym(S)``): the halves are recovered by slicing the stored embeddings and
re-normalising them (:meth:`CLIP2Video.branches`): ``training_logits`` gives the two score
matrices, ``contrastive`` (global, weight w) and ``tab`` (weight 1 - w), and the shared
(distributed) loss takes symmetric InfoNCE over each.

Differences from the official code, on purpose:

- the repository releases inference code only (issues #9, #10): the training recipe is
  CLIP4Clip's (batch 128, 5 epochs, lr 1e-4 new / 1e-7 CLIP, wd 0.2, warmup 10 %, AdamW);
- any frame count T >= 1 works (odd T: the large-rate branch keeps frames 0, 2, ..., T-1);
- padded frames follow the code: ``d_t`` is masked by ``f_{t+1}`` inside the difference
  attention and by ``f_t`` in the interleaved sequence;
- the key-padding mask is laid out sequence-major (CLIP4Clip's ``repeat_interleave``), the
  layout torch's attention expects. CLIP2Video's ``module_cross.py`` expands it head-major,
  ``attn_mask.repeat(n_head, 1, 1)``, so entry ``b·H + h`` gets the mask of sequence
  ``(b·H + h) mod B``: in a batch of videos of mixed lengths a video attends under another
  video's mask (padded frames seen, real ones hidden). With equal lengths the two agree.

VATEX uses ``num_centers=7`` (``test/vatex_TAB_TDB.sh``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever
from retrieval.temporal import copy_text_blocks, mean_pool_normalized, run_blocks, text_position_embedding

FRAME_TYPE, DIFFERENCE_TYPE = 1, 0  # type-embedding ids of the official code
CENTER_STD = 64**-0.5  # the code's N(0, 0.125) for both centre tables, whatever the width


class TemporalDifferenceBlock(nn.Module):
    """TDB: frames and their difference-enhanced tokens, interleaved, with positions and types.

    Shared by the global branch and the TAB's large-rate frames. Holds the frame position
    embeddings (CLIP text positions) that the temporal transformers also use.

    Args:
        clip: the backbone whose text block 0 and positional embedding initialise the block.
    """

    def __init__(self, clip: CLIPBackbone) -> None:
        super().__init__()
        self.frame_position_embeddings = text_position_embedding(clip)
        self.type_embedding = nn.Embedding(2, clip.text_width)
        self.type_embedding.weight.data.copy_(clip.positional_embedding.detach()[:2])
        self.difference_attention = copy_text_blocks(clip, 1)
        self.difference_norm = nn.LayerNorm(clip.text_width)

    def positions(self, num_frames: int, device: torch.device) -> Tensor:
        """Frame position embeddings ``[T, D]``."""
        limit = self.frame_position_embeddings.num_embeddings
        if num_frames > limit:
            raise ValueError(f"{num_frames} frames exceed the {limit} frame positions (CLIP's text context)")
        return self.frame_position_embeddings(torch.arange(num_frames, device=device))

    def differences(self, frames: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Difference-enhanced tokens ``2 sigma(LN(Attn(f_{t+1} - f_t + p_{t+1}))) - 1``: ``[B, T-1, D]``."""
        d = frames[:, 1:] - frames[:, :-1] + positions[1:]  # [B, T-1, D]
        d = run_blocks(self.difference_attention, d, mask[:, 1:])
        return 2 * torch.sigmoid(self.difference_norm(d)) - 1

    def forward(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Interleave ``[f_1, d_1, f_2, ..., d_{T-1}, f_T]`` with position and type embeddings added.

        Args:
            frames: ``[B, T, D]`` frame features.
            mask: ``[B, T]`` valid frames.

        Returns:
            ``(tokens [B, 2T-1, D], mask [B, 2T-1])``; frames sit at the even indices.
        """
        positions = self.positions(frames.shape[1], frames.device)  # [T, D]
        types = self.type_embedding.weight  # [2, D]
        f = frames + positions + types[FRAME_TYPE]  # [B, T, D]
        if frames.shape[1] == 1:  # a single frame has no difference to insert
            return f, mask
        d = self.differences(frames, mask, positions) + positions[:-1] + types[DIFFERENCE_TYPE]  # [B, T-1, D]
        pairs = rearrange(torch.stack([f[:, :-1], d], dim=2), "b t two d -> b (t two) d")
        tokens = torch.cat([pairs, f[:, -1:]], dim=1)  # [B, 2T-1, D]
        pair_mask = rearrange(torch.stack([mask[:, :-1], mask[:, :-1]], dim=2), "b t two -> b (t two)")
        return tokens, torch.cat([pair_mask, mask[:, -1:]], dim=1)


class TemporalAlignmentBlock(nn.Module):
    """TAB aggregation: ``K`` centres shared by text and video tokens (NetVLAD-like).

    ``a_{n,k} = softmax_k(x_n . W_c,k)``, ``r_k = sum_n m_n a_{n,k} (x_n - E_c,k)``; each ``r_k`` is
    L2-normalised, the K are averaged and the mean is L2-normalised. ``W_c`` and ``E_c`` are the
    code's ``weight_center`` and ``emb_center``.

    Args:
        width: token width D.
        num_centers: K.
    """

    def __init__(self, width: int, num_centers: int) -> None:
        super().__init__()
        self.assignment_weights = nn.Parameter(torch.randn(num_centers, width) * CENTER_STD)  # W_c [K, D]
        self.centers = nn.Parameter(torch.randn(num_centers, width) * CENTER_STD)  # E_c [K, D]

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens [B, N, D]``, ``mask [B, N]`` -> aligned embedding ``[B, D]`` (unit norm)."""
        assign = torch.softmax(tokens @ self.assignment_weights.T, dim=-1)  # a [B, N, K]
        assign = assign * mask.unsqueeze(-1).to(tokens.dtype)
        # sum_n m a (x - E) = sum_n m a x - (sum_n m a) E, without a [B, N, K, D] tensor
        residuals = torch.einsum("bnk,bnd->bkd", assign, tokens) - assign.sum(1).unsqueeze(-1) * self.centers  # [B,K,D]
        return F.normalize(F.normalize(residuals, dim=-1).mean(1), dim=-1)


class CLIP2Video(Retriever):
    """CLIP2Video: TDB global embedding and TAB aligned embedding, mixed into one dot product.

    Args:
        num_temporal_layers: depth of the temporal transformer over the interleaved tokens
            (CLIP text blocks 0-3).
        num_centers: TAB centres K (5; 7 for VATEX).
        center_weight: w, the weight of the global score (``center_weight`` in the code);
            ``1 - w`` weighs the TAB score and loss.
    """

    fusion_free = True

    def __init__(self, num_temporal_layers: int = 4, num_centers: int = 5, center_weight: float = 0.5,
                 **shared) -> None:
        super().__init__(**shared)
        if not 0.0 <= center_weight <= 1.0:
            raise ValueError(f"center_weight={center_weight} must be in [0, 1] (the weight of the global score)")
        if num_centers < 1:
            raise ValueError(f"num_centers={num_centers} must be at least 1")
        if self.clip.text_width != self.clip.embed_dim:
            raise ValueError(
                f"CLIP2Video runs CLIP text blocks (width {self.clip.text_width}) on frame features "
                f"(width {self.clip.embed_dim}); {self.clip.name!r} has different widths"
            )
        self.center_weight = center_weight
        self.tdb = TemporalDifferenceBlock(self.clip)
        self.temporal_blocks = copy_text_blocks(self.clip, num_temporal_layers)
        self.action_blocks = copy_text_blocks(self.clip, 1)
        self.tab = TemporalAlignmentBlock(self.clip.embed_dim, num_centers)

    # ------------------------------------------------------------------ video
    def global_embedding(self, frames: Tensor, mask: Tensor) -> Tensor:
        """TDB + temporal transformer, frame outputs + residual, meanP: ``[B, T, D] -> [B, D]``."""
        tokens, token_mask = self.tdb(frames, mask)  # [B, 2T-1, D]
        out = run_blocks(self.temporal_blocks, tokens, token_mask)[:, 0::2]  # [B, T, D] frame positions
        return mean_pool_normalized(out + frames, mask)

    def video_alignment_tokens(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """TAB video tokens: the T frames and the TDB-enhanced large-rate frames, ``[B, T + ceil(T/2), D]``."""
        large, large_mask = frames[:, 0::2], mask[:, 0::2]  # [B, T', D]
        tokens, token_mask = self.tdb(large, large_mask)  # [B, 2T'-1, D]
        enhanced = run_blocks(self.action_blocks, tokens, token_mask)[:, 0::2] + large  # [B, T', D]
        return torch.cat([frames, enhanced], dim=1), torch.cat([mask, large_mask], dim=1)

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        x = self.clip.encode_frames(frames)  # [B, T, D], un-normalised as in the code
        v_glob = self.global_embedding(x, frame_mask)  # [B, D]
        v_tab = self.tab(*self.video_alignment_tokens(x, frame_mask))  # [B, D]
        return VideoFeatures(embedding=self.mix(v_glob, v_tab))  # [B, 2D]

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, words = self.clip.encode_text(tokens)  # [Q, D], [Q, L, D]
        word_mask = tokens != 0
        word_mask[:, 0] = False  # SOT out, EOT kept
        return TextFeatures(embedding=self.mix(F.normalize(sentence, dim=-1), self.tab(words, word_mask)))  # [Q, 2D]

    # ------------------------------------------------------------------ one dot product, two losses
    def mix(self, glob: Tensor, tab: Tensor) -> Tensor:
        """``[sqrt(w) glob, sqrt(1-w) tab]``: the dot product of two mixes is ``w cos_glob + (1-w) cos_TAB``."""
        w = self.center_weight
        return torch.cat([math.sqrt(w) * glob, math.sqrt(1 - w) * tab], dim=-1)

    def branches(self, mixed: Tensor) -> tuple[Tensor, Tensor]:
        """Invert :meth:`mix`: the unit global and TAB halves ``([n, D], [n, D])`` (a zero-weight half stays 0)."""
        glob, tab = mixed.chunk(2, dim=-1)
        return F.normalize(glob, dim=-1), F.normalize(tab, dim=-1)

    @property
    def loss_weights(self) -> dict[str, float]:
        """``w CE_sym(S_glob) + (1 - w) CE_sym(S_TAB)``: the official loss."""
        return {"contrastive": self.center_weight, "tab": 1 - self.center_weight}

    def training_logits(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """The global and the TAB branch's logits, each ``σ · cos`` of its unit halves."""
        (t_glob, t_tab), (v_glob, v_tab) = self.branches(text.embedding), self.branches(video.embedding)
        return {"contrastive": self.logit_scale() * t_glob @ v_glob.T, "tab": self.logit_scale() * t_tab @ v_tab.T}
