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

from collections.abc import Mapping
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


MODES = ("learned", "codebook")


def head_from_state(state: Mapping[str, torch.Tensor], client_id: str, people: int, dim: int, face: FaceConfig,
                    secret: int) -> PrivateHead:
    """The party's head from its client state (``personal/head.*``), created on first use.

    It lives in the client state store like any personal layer: checkpointed with a simulation, in the
    party's own folder in a deployment, never in a message. ``secret`` seeds a new head's initial values
    and row choices and stays with the clients. A stored head whose kind or size no longer fits is refused.
    """
    if "personal/head.weight" in state:
        head = PrivateHead("learned", weight=state["personal/head.weight"].clone())
    elif "personal/head.rows" in state:
        head = PrivateHead("codebook", rows=state["personal/head.rows"].clone())
    else:
        head = _create(client_id, people, dim, face, secret)
    if head.mode != face.templates or head.people != people:
        raise ConfigError(f"{client_id} already has a {head.mode} head for {head.people} people but this task "
                          f"asks for {face.templates} with {people}; keep the template mode and data fixed")
    return head


def head_state(head: PrivateHead) -> dict[str, torch.Tensor]:
    """What the client stores of its head (its personal state)."""
    if head.mode == "learned":
        return {"personal/head.weight": head.weight.detach().to("cpu")}
    return {"personal/head.rows": head.rows.to("cpu")}


def _create(client_id: str, people: int, dim: int, face: FaceConfig, secret: int) -> PrivateHead:
    generator = torch.Generator().manual_seed(derive_seed(secret, "head", client_id))
    if face.templates == "learned":
        return PrivateHead("learned", weight=torch.randn(people, dim, generator=generator) / dim**0.5)
    size = face.codebook_size or dim
    pool = pool_rows(size, face.pool, face.pools)
    if people > len(pool):
        raise ConfigError(f"{client_id} knows {people} people but its codebook pool has {len(pool)} rows; "
                          "raise the embedding dimension or use fewer pools")
    return PrivateHead("codebook", rows=pool[torch.randperm(len(pool), generator=generator)[:people]])
