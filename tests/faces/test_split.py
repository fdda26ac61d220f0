"""Identity splits: no person in two parties, held-out people in no party, party-local labels only."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import ConfigError
from fedlearn.faces.split import gallery_probe_split, party_client_data, split_identities


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_parties_are_disjoint_and_held_out_people_train_nowhere(seed):
    split = split_identities(40, 3, 10, seed)
    parties = [set(p) for p in split.parties]
    assert [len(p) for p in parties] == [10, 10, 10]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not parties[a] & parties[b]
    assert len(split.held_out) == 10
    assert not set(split.held_out) & set(split.training)
    assert set(split.held_out) | set(split.training) == set(range(40))


def test_split_is_seeded():
    assert split_identities(40, 3, 10, 5) == split_identities(40, 3, 10, 5)
    assert split_identities(40, 3, 10, 5) != split_identities(40, 3, 10, 6)
    uneven = split_identities(40, 3, 12, 0)
    assert sorted(len(p) for p in uneven.parties) == [9, 9, 10]


def test_impossible_split_is_refused():
    with pytest.raises(ConfigError, match="parties"):
        split_identities(10, 5, 4, 0)


def test_each_party_holds_only_its_people_with_local_labels(synthetic_faces):
    faces = synthetic_faces(12, 4, size=16)
    split = split_identities(12, 3, 3, seed=1)
    clients = party_client_data(faces, split)
    assert list(clients) == ["party-0", "party-1", "party-2"]
    for people, data in zip(split.parties, clients.values()):
        true_person = data.train.x[:, 0, 0, 0].long()  # written into the photo by the fixture
        assert set(true_person.tolist()) == set(people)
        assert not set(true_person.tolist()) & set(split.held_out)
        assert len(data.train) == 4 * len(people)
        # labels are the party's own numbering 0..n-1, consistent with the real person
        assert sorted(set(data.train.y.tolist())) == list(range(len(people)))
        for label in range(len(people)):
            assert set(true_person[data.train.y == label].tolist()) == {people[label]}


def test_gallery_and_probe_partition_every_persons_photos():
    identity = torch.arange(5).repeat_interleave(10)
    gallery, probe = gallery_probe_split(identity, 2, seed=3)
    assert torch.bincount(identity[gallery]).tolist() == [2] * 5
    assert torch.bincount(identity[probe]).tolist() == [8] * 5
    assert sorted(torch.cat([gallery, probe]).tolist()) == list(range(50))
    assert torch.equal(gallery, gallery_probe_split(identity, 2, seed=3)[0])
    with pytest.raises(ConfigError, match="gallery"):
        gallery_probe_split(identity, 10, seed=0)
