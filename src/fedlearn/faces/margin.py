"""Large-margin cosine softmax (CosFace: Wang et al., CVPR 2018) over a set of identity templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(embeddings: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """cos(embedding_i, template_j) for every photo i and template j."""
    return F.normalize(embeddings, dim=1) @ F.normalize(templates, dim=1).T


def margin_cross_entropy(embeddings: torch.Tensor, templates: torch.Tensor, targets: torch.Tensor,
                         scale: float, margin: float) -> torch.Tensor:
    """CosFace loss: cross-entropy of s * (cos - m * [j is the target]), averaged over the batch.

    Every template other than the target is a negative, so the templates given decide which people
    (or which template slots) a photo is pushed away from.
    """
    cos = cosine_logits(embeddings, templates)
    logits = scale * (cos - margin * F.one_hot(targets, cos.shape[1]).to(cos.dtype))
    return F.cross_entropy(logits, targets)
