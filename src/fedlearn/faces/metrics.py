"""Open-set face metrics on similarity scores: ROC AUC, TAR at a fixed FAR, and rank-k identification.

All are computed exactly from the scores (no interpolation); ties are resolved pessimistically, so a
tie never counts in the model's favour except in the AUC, where it counts one half (Mann-Whitney).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlearn.errors import ConfigError


def _scores(values: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    array = array.reshape(-1)
    if array.size == 0:
        raise ConfigError(f"no {what} scores to evaluate; the evaluation set needs at least two people with two photos")
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{what} scores contain NaN or Inf; check the model's embeddings")
    return array


def roc_auc(genuine: torch.Tensor | np.ndarray, impostor: torch.Tensor | np.ndarray) -> float:
    """P(genuine score > impostor score) + P(tie) / 2 over all (genuine, impostor) pairs: the area under the ROC."""
    g, i = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    both = np.concatenate([g, i])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_scores = both[order]
    start = 0
    while start < both.size:  # average rank over each run of tied scores
        end = start
        while end + 1 < both.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[: g.size].sum()
    return float((rank_sum - g.size * (g.size + 1) / 2.0) / (g.size * i.size))


def tar_at_far(genuine: torch.Tensor | np.ndarray, impostor: torch.Tensor | np.ndarray,
               far: float) -> tuple[float, float, float]:
    """(TAR, threshold, achieved FAR) for accepting scores strictly above the tightest threshold with FAR <= ``far``.

    With n impostor pairs at most floor(far * n) may be accepted: the threshold is the
    (floor(far * n) + 1)-th highest impostor score, so the achieved FAR never exceeds ``far``.
    """
    if not 0.0 <= far <= 1.0:
        raise ConfigError(f"FAR must lie in [0, 1], got {far}")
    g, i = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    allowed = math.floor(far * i.size + 1e-9)
    if allowed >= i.size:
        threshold = -math.inf
    else:
        threshold = float(np.sort(i)[::-1][allowed])
    return float(np.mean(g > threshold)), threshold, float(np.mean(i > threshold))


def pair_scores(embeddings: torch.Tensor, identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every unordered pair of photos, split into (same person, different people)."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    upper = torch.triu_indices(len(identity), len(identity), offset=1)
    scores = similarity[upper[0], upper[1]]
    same = identity[upper[0]] == identity[upper[1]]
    return scores[same], scores[~same]


def rank_k_identification(probe: torch.Tensor, probe_identity: torch.Tensor, gallery: torch.Tensor,
                          gallery_identity: torch.Tensor, k: int = 1) -> float:
    """Share of probes whose true person is among the ``k`` most similar gallery people (cosine similarity).

    A person's score is their best-matching gallery photo; a wrong person tied with the true one
    ranks ahead of it, so ties never help.
    """
    people = torch.unique(gallery_identity)
    if not bool(torch.isin(probe_identity, people).all()):
        raise ConfigError("a probe's person has no gallery photo; every probe identity must be enrolled")
    unit_p = torch.nn.functional.normalize(probe.double(), dim=1)
    unit_g = torch.nn.functional.normalize(gallery.double(), dim=1)
    similarity = unit_p @ unit_g.T
    per_person = torch.stack([similarity[:, gallery_identity == p].max(dim=1).values for p in people], dim=1)
    true_score = per_person[torch.arange(len(probe_identity)), torch.searchsorted(people, probe_identity)]
    wrong_at_least_as_high = (per_person >= true_score[:, None]).sum(dim=1) - 1
    return float((wrong_at_least_as_high < k).double().mean())
