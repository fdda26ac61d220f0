"""Exact checks of the open-set face metrics on small hand-built score sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedlearn.errors import ConfigError
from fedlearn.faces.metrics import pair_scores, rank_k_identification, roc_auc, tar_at_far


def test_auc_counts_ties_as_half():
    genuine, impostor = [0.9, 0.8, 0.4], [0.5, 0.4, 0.1, 0.0]
    # 0.9 and 0.8 beat all four impostors; 0.4 beats two and ties one: (4 + 4 + 2.5) / 12
    assert roc_auc(genuine, impostor) == pytest.approx(10.5 / 12, abs=1e-15)
    labels = [1] * 3 + [0] * 4
    assert roc_auc(genuine, impostor) == pytest.approx(roc_auc_score(labels, genuine + impostor), abs=1e-12)


def test_auc_extremes():
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0], [1.0, 2.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5


def test_tar_at_far_picks_the_tightest_threshold_within_the_budget():
    impostor = np.arange(10) / 10.0  # 0.0 .. 0.9
    genuine = [0.95, 0.85, 0.8, 0.5]
    tar, threshold, far = tar_at_far(genuine, impostor, 0.1)  # one false accept allowed: threshold 0.8
    assert (tar, threshold, far) == (0.5, 0.8, 0.1)  # 0.8 itself is not strictly above the threshold
    tar, threshold, far = tar_at_far(genuine, impostor, 0.05)  # none allowed: threshold 0.9
    assert (tar, threshold, far) == (0.25, 0.9, 0.0)
    assert tar_at_far(genuine, impostor, 0.0) == (0.25, 0.9, 0.0)
    tar, threshold, far = tar_at_far(genuine, impostor, 1.0)
    assert (tar, far) == (1.0, 1.0) and threshold == -math.inf


def test_tar_at_far_ties_never_exceed_the_far():
    tar, threshold, far = tar_at_far([0.95, 0.9], [0.9, 0.9, 0.1], 1 / 3)
    assert threshold == 0.9 and far == 0.0 and tar == 0.5


def test_pair_scores_split_same_and_different_people():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    genuine, impostor = pair_scores(embeddings, torch.tensor([0, 0, 1]))
    half = math.sqrt(0.5)
    assert genuine.tolist() == pytest.approx([half])
    assert sorted(impostor.tolist()) == pytest.approx([0.0, half])


def test_rank_k_identification_is_pessimistic_on_ties():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery_ids = torch.tensor([7, 9])
    probes = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 1.0]])
    probe_ids = torch.tensor([7, 7, 9])  # right, wrong, tied
    assert rank_k_identification(probes, probe_ids, gallery, gallery_ids, k=1) == pytest.approx(1 / 3)
    assert rank_k_identification(probes, probe_ids, gallery, gallery_ids, k=2) == 1.0


def test_rank_one_uses_a_persons_best_gallery_photo():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    gallery_ids = torch.tensor([0, 0, 1])
    probe = torch.tensor([[0.1, 1.0]])  # nearest photo is person 0's second one
    assert rank_k_identification(probe, torch.tensor([0]), gallery, gallery_ids) == 1.0
    assert rank_k_identification(probe, torch.tensor([1]), gallery, gallery_ids) == 0.0


def test_metrics_refuse_bad_input():
    with pytest.raises(ConfigError, match="no genuine"):
        roc_auc([], [0.1])
    with pytest.raises(ConfigError, match="NaN"):
        tar_at_far([float("nan")], [0.1], 0.01)
    with pytest.raises(ConfigError, match="FAR"):
        tar_at_far([0.5], [0.1], 2.0)
    with pytest.raises(ConfigError, match="enrolled"):
        rank_k_identification(torch.ones(1, 2), torch.tensor([3]), torch.ones(1, 2), torch.tensor([4]))
