"""Private identity heads and the public codebook that spreads every party's templates apart.

The codebook idea is adapted from FedUV (Hosseini et al., "Federated Learning of User Verification
Models Without Sharing Embeddings", ICML 2021): each user's class vector is a secret codeword fixed
in advance, chosen from a code whose words are far apart, so no party needs the others' vectors
as negatives and none is ever shared. Fixing the classifier costs little accuracy (Hoffer et al.,
"Fix your classifier", ICLR 2018). What differs here: the code is a random orthonormal matrix
rather than an error-correcting code; the server splits its rows into disjoint pools, one per party,
so two parties can never pick the same row (FedUV relies on long random codewords instead); and,
as in FedFR's use of public classes as negatives (Liu et al., AAAI 2022), every codebook row outside
a party's own people is a CosFace negative: a party pushes its faces away from the rows other
parties may use without knowing which ones they use. FedAwS (Yu et al., ICML 2020) and FedFace
(Aggarwal et al., IJCB 2021) spread the class embeddings out at the server instead, and FedGC (Niu &
Deng, AAAI 2022) corrects their gradients there; all of them need the templates at the server,
which is exactly what must not leave a party in this setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlearn.errors import ConfigError
from fedlearn.faces.config import FaceConfig
from fedlearn.seeding import derive_seed


def public_codebook(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``rows`` orthonormal vectors in R^dim, the same on every machine for a given public seed."""
    if not 1 <= rows <= dim:
        raise ConfigError(f"an orthonormal codebook of {rows} rows needs rows <= embedding dimension {dim}; "
                          "use a larger embedding or fewer rows")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # the unique Q with a positive diagonal R, whatever LAPACK returns
    return q.T[:rows].to(torch.float32).contiguous()


def pool_rows(codebook_size: int, pool: int, pools: int) -> torch.Tensor:
    """Indices of the codebook rows in pool ``pool`` of ``pools`` equal, disjoint slices."""
    size = codebook_size // pools
    return torch.arange(pool * size, (pool + 1) * size)


@dataclass
class PrivateHead:
    """One party's identity classifier: trainable rows (``learned``) or its secret codebook rows (``codebook``)."""

    mode: str
    weight: torch.Tensor | None = None  # (people, dim), learned mode
    rows: torch.Tensor | None = None  # (people,) codebook row per local person, codebook mode

    @property
    def people(self) -> int:
        return int(self.weight.shape[0] if self.weight is not None else self.rows.shape[0])


class HeadStore:
    """Client-side memory of every party's private head, keyed by client id; nothing here is ever sent.

    In a deployment each party's process holds only its own entry; the simulation keeps all of them
    in the one trainer, which lives on the client side of the runtime boundary. ``secret`` seeds the
    heads' initial values and row choices and stays with the clients.
    """

    def __init__(self, secret: int = 0) -> None:
        self.secret = secret
        self._heads: dict[str, PrivateHead] = {}

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._heads

    def __len__(self) -> int:
        return len(self._heads)

    def get(self, client_id: str, people: int, dim: int, face: FaceConfig) -> PrivateHead:
        """The party's head, created on first use; refuses a head whose kind or size no longer fits."""
        head = self._heads.get(client_id)
        if head is None:
            head = self._create(client_id, people, dim, face)
            self._heads[client_id] = head
        if head.mode != face.templates or head.people != people:
            raise ConfigError(f"{client_id} already has a {head.mode} head for {head.people} people but this task "
                              f"asks for {face.templates} with {people}; keep the template mode and data fixed")
        return head

    def _create(self, client_id: str, people: int, dim: int, face: FaceConfig) -> PrivateHead:
        generator = torch.Generator().manual_seed(derive_seed(self.secret, "head", client_id))
        if face.templates == "learned":
            return PrivateHead("learned", weight=torch.randn(people, dim, generator=generator) / dim**0.5)
        size = face.codebook_size or dim
        pool = pool_rows(size, face.pool, face.pools)
        if people > len(pool):
            raise ConfigError(f"{client_id} knows {people} people but its codebook pool has {len(pool)} rows; "
                              "raise the embedding dimension or use fewer pools")
        return PrivateHead("codebook", rows=pool[torch.randperm(len(pool), generator=generator)[:people]])

    def items(self) -> list[tuple[str, PrivateHead]]:
        return list(self._heads.items())
