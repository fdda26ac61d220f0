"""Seeded identity splits: disjoint people per party, people held out of training, gallery and probe photos."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlearn.client.data import ClientData
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.faces.data import FaceImages


@dataclass(frozen=True)
class IdentitySplit:
    """Which people each party knows (no one in two parties) and who is held out of all training."""

    parties: tuple[tuple[int, ...], ...]
    held_out: tuple[int, ...]

    @property
    def training(self) -> tuple[int, ...]:
        """Every person some party trains on, sorted."""
        return tuple(sorted(i for party in self.parties for i in party))

    def client_ids(self) -> list[str]:
        return [f"party-{k}" for k in range(len(self.parties))]


def split_identities(num_identities: int, num_parties: int, num_held_out: int, seed: int) -> IdentitySplit:
    """Shuffle the people with ``seed``, hold out ``num_held_out`` and deal the rest into parties of near-equal size."""
    if num_parties < 1 or num_held_out < 2 or num_identities - num_held_out < num_parties * 2:
        raise ConfigError(
            f"cannot split {num_identities} people into {num_held_out} held out and {num_parties} parties of at "
            "least 2 each; use fewer parties or hold out fewer people (at least 2)"
        )
    order = np.random.default_rng(seed).permutation(num_identities)
    held_out = tuple(sorted(int(i) for i in order[:num_held_out]))
    rest = order[num_held_out:]
    parties = tuple(tuple(sorted(int(i) for i in chunk)) for chunk in np.array_split(rest, num_parties))
    return IdentitySplit(parties=parties, held_out=held_out)


def local_dataset(images: FaceImages, identities: tuple[int, ...]) -> ArrayDataset:
    """The photos of ``identities`` labelled 0..n-1 in the party's own numbering (its labels mean nothing elsewhere)."""
    part = images.select(list(identities))
    lookup = torch.full((int(images.identity.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.as_tensor(identities)] = torch.arange(len(identities))
    return ArrayDataset(part.x, lookup[part.identity])


def party_client_data(images: FaceImages, split: IdentitySplit, batch_size: int | None = None) -> dict[str, ClientData]:
    """One ClientData per party, holding only that party's people with party-local labels."""
    return {cid: ClientData(train=local_dataset(images, people), batch_size=batch_size)
            for cid, people in zip(split.client_ids(), split.parties)}


def gallery_probe_split(identity: torch.Tensor, per_identity: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``per_identity`` seeded gallery photos per person and of all remaining (probe) photos."""
    generator = torch.Generator().manual_seed(seed)
    gallery: list[torch.Tensor] = []
    for person in torch.unique(identity):
        photos = torch.nonzero(identity == person).flatten()
        if len(photos) <= per_identity:
            raise ConfigError(f"person {int(person)} has {len(photos)} photos, too few for {per_identity} in the "
                              "gallery and at least one probe; lower the gallery size")
        gallery.append(photos[torch.randperm(len(photos), generator=generator)[:per_identity]])
    gallery_idx = torch.sort(torch.cat(gallery)).values
    is_probe = torch.ones(len(identity), dtype=torch.bool)
    is_probe[gallery_idx] = False
    return gallery_idx, torch.nonzero(is_probe).flatten()
