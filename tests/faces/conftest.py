"""Synthetic face sets for the fast tests: each photo's identity is written into its first pixel."""

from __future__ import annotations

import pytest
import torch

from fedlearn.faces.data import FaceImages


def make_faces(people: int, photos: int, size: int = 64, seed: int = 0) -> FaceImages:
    """Random 1 x size x size photos; pixel (0, 0) holds the person's number and (0, 1) the photo number."""
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(people).repeat_interleave(photos)
    photo = torch.arange(1, photos + 1).repeat(people)
    # each person gets a mean image of their own, so a model has something to learn
    means = torch.randn(people, 1, size, size, generator=generator)
    x = means[identity] + 0.5 * torch.randn(len(identity), 1, size, size, generator=generator)
    x[:, 0, 0, 0] = identity.float()
    x[:, 0, 0, 1] = photo.float()
    return FaceImages(x=x, identity=identity, photo=photo, source="synthetic")


@pytest.fixture
def synthetic_faces():
    return make_faces
