"""Classification metrics shared by training and fault campaigns.

Top2Diff (the paper's margin measure) is the softmax probability of the top-1 class minus that of
the runner-up, in percent: a model whose predictions win by a wide margin needs a larger
perturbation to flip them.
"""

from __future__ import annotations

import torch


def top2diff(logits: torch.Tensor) -> torch.Tensor:
    """Per row of ``logits`` ``[N, C]``: top-1 minus top-2 softmax probability, in percent.

    Rows with a NaN or infinite logit give NaN: no margin is defined for them.
    """
    probabilities = torch.softmax(logits.float(), dim=-1)
    top = probabilities.topk(2, dim=-1).values
    margin = (top[..., 0] - top[..., 1]) * 100.0
    return torch.where(torch.isfinite(logits).all(dim=-1), margin, torch.nan)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: whether ``labels`` is among the ``k`` highest logits."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels.unsqueeze(-1)).any(dim=-1)
