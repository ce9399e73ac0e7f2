"""The losses of the SOLO family: sigmoid focal loss (classes) and dice loss (masks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Summed focal loss of ``logits`` [N, C] against ``labels`` [N] (``num_classes`` = background)."""
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-mask ``1 - 2Σpq / (Σp² + Σq² + 2·eps)`` of ``probs`` [P, H, W] in [0, 1]; returns [P]."""
    p = probs.flatten(1).float()
    q = targets.flatten(1).float()
    inter = (p * q).sum(1)
    return 1 - 2 * inter / ((p * p).sum(1) + eps + (q * q).sum(1) + eps)
