"""The shared training recipe: learning-rate schedule and method names."""

from __future__ import annotations

import math

import pytest

from fedlearn.errors import ConfigError
from fedlearn.faces.experiment import FaceRunSettings, run_method, scheduled_lr
from fedlearn.faces.split import split_identities


def test_warmup_then_cosine():
    assert scheduled_lr(0.05, 1, 60, 5) == pytest.approx(0.01)
    assert scheduled_lr(0.05, 5, 60, 5) == pytest.approx(0.05)
    assert scheduled_lr(0.05, 6, 60, 5) == pytest.approx(0.05)  # the cosine starts at its top
    assert scheduled_lr(0.05, 60, 60, 5) == pytest.approx(0.025 * (1 + math.cos(math.pi * 54 / 55)))
    assert scheduled_lr(0.1, 1, 10, 0) == pytest.approx(0.1)


def test_unknown_method_is_refused(synthetic_faces):
    with pytest.raises(ConfigError, match="unknown face method"):
        run_method("fedface", synthetic_faces(9, 2, size=16), split_identities(9, 3, 3, 0),
                   FaceRunSettings(rounds=1, width=1, embedding_dim=4), seed=0)
