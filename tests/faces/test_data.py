"""The real face files: 40 people x 10 photos in each source, and the check that they are the same people."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import DataError
from fedlearn.faces.data import PIXEL_MEAN, PIXEL_STD, crop_match, load_faces, load_raw_pair


@pytest.fixture(scope="module")
def root(shared_dataset):
    shared_dataset("olivetti_faces")
    return shared_dataset("att_orl_faces").parent


@pytest.mark.parametrize("source", ["olivetti", "orl"])
def test_each_source_is_40_people_with_10_photos(root, source):
    faces = load_faces(root, source)
    assert faces.x.shape == (400, 1, 64, 64) and faces.x.dtype == torch.float32
    assert torch.bincount(faces.identity).tolist() == [10] * 40
    assert torch.equal(faces.photo, torch.arange(1, 11).repeat(40))
    assert torch.equal(faces.identity, torch.arange(40).repeat_interleave(10))


def test_olivetti_pixels_match_sklearn(root):
    faces = load_faces(root / "olivetti_faces", "olivetti")
    first = faces.x[0, 0, 0, :3] * PIXEL_STD + PIXEL_MEAN  # sklearn's image 0 is person 0, photo 1
    assert first.tolist() == pytest.approx([0.30991736, 0.3677686, 0.41735536], abs=1e-6)


def test_unknown_source_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="never both"):
        load_faces(tmp_path, "olivetti+orl")
    with pytest.raises(DataError, match="olivetti_faces.npz not found"):
        load_faces(tmp_path, "olivetti")


@pytest.mark.slow
def test_olivetti_photos_are_crops_of_the_same_orl_photos(root):
    """Each checked Olivetti photo matches a crop of its own ORL photo better than any other person's photo."""
    olivetti, orl = load_raw_pair(root)
    for person in (0, 13, 26, 39):
        index = person * 10 + 4  # photo 5, usually a turned head
        own = crop_match(olivetti[index], orl[index], step=4)
        others = [crop_match(olivetti[index], orl[other * 10 + 4], step=4) for other in range(person % 5, 40, 13)
                  if other != person]
        assert own > 0.85 and own > max(others) + 0.05, (person, own, others)
