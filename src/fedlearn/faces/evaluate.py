"""Open-set evaluation of a face backbone on people it never trained on: verification and identification."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.faces.data import FaceImages
from fedlearn.faces.metrics import pair_scores, rank_k_identification, roc_auc, tar_at_far
from fedlearn.faces.split import gallery_probe_split


@torch.no_grad()
def embed(backbone: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of ``x`` in eval mode, on the backbone's device, returned on the CPU."""
    backbone.eval()
    device = next(backbone.parameters()).device
    return torch.cat([backbone(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def open_set_report(backbone: nn.Module, held_out: FaceImages, gallery_per_identity: int = 1,
                    seed: int = 0) -> dict[str, float]:
    """ROC AUC and TAR@FAR 1e-2 / 1e-3 over all photo pairs, and rank-1 on a seeded gallery/probe split."""
    embeddings = embed(backbone, held_out.x)
    genuine, impostor = pair_scores(embeddings, held_out.identity)
    gallery, probe = gallery_probe_split(held_out.identity, gallery_per_identity, seed)
    tar2, _, far2 = tar_at_far(genuine, impostor, 1e-2)
    tar3, _, far3 = tar_at_far(genuine, impostor, 1e-3)
    return {
        "auc": roc_auc(genuine, impostor),
        "tar_at_far_1e-2": tar2,
        "tar_at_far_1e-3": tar3,
        "achieved_far_1e-2": far2,
        "achieved_far_1e-3": far3,
        "rank1": rank_k_identification(embeddings[probe], held_out.identity[probe], embeddings[gallery],
                                       held_out.identity[gallery], k=1),
        "genuine_pairs": int(genuine.numel()),
        "impostor_pairs": int(impostor.numel()),
        "probes": int(probe.numel()),
        "gallery": int(gallery.numel()),
    }
