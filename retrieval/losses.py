"""The contrastive loss and the one feature gather every method shares.

Gathering keeps gradients (torch.distributed's autograd all_gather, whose backward sums the
incoming gradients across ranks), and each rank computes the loss of its own queries against
the global batch (open_clip's ``local_loss``). With DDP's gradient averaging this gives exactly
the gradient of the single-process loss on the concatenated batch (pinned by a 2-process test).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

from retrieval.features import Features


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: Features) -> Features:
    """Concatenate every rank's features along the leading dimension, keeping gradients.

    All ranks must hold the same number of rows (the training sampler guarantees it).
    """
    _, world_size = world()
    if world_size == 1:
        return features
    return type(features)(**{name: torch.cat(dist_fn.all_gather(t.contiguous())) for name, t in features.items()})


def symmetric_infonce(logits_t2v: Tensor, logits_v2t: Tensor, targets: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP4Clip's ``CrossEn`` on S and Sᵀ, averaged).

    Args:
        logits_t2v: ``[B, N]`` scaled scores of this rank's texts against all videos.
        logits_v2t: ``[B, N]`` scaled scores of this rank's videos against all texts.
        targets: ``[B]`` column of each row's positive.
    """
    return 0.5 * (F.cross_entropy(logits_t2v, targets) + F.cross_entropy(logits_v2t, targets))
