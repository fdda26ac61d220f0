"""Server side of federated face recognition: FedAvg of the embedding backbone only.

The server never holds, receives or sends an identity template. ``PrivateHeadFedAvg`` is the plain
baseline (each party trains its own head in private). ``CodebookFedAvg`` adds the correction for the
people a party never sees as negatives: it hands every party a disjoint pool of rows of a public,
data-free orthonormal codebook (see fedlearn.faces.templates for the method and its sources). The
server knows which pool a party draws from, never which row stands for which person or how many are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fedlearn.errors import ConfigError
from fedlearn.faces.config import FaceConfig
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalTask
from fedlearn.strategies.base import ServerState
from fedlearn.strategies.fedavg import FedAvg


class PrivateHeadFedAvg(FedAvg):
    """FedAvg of backbone updates; the task config carries the public CosFace settings under ``face``."""

    name = "private-head-fedavg"

    def __init__(self, local: LocalConfig | None = None, face: FaceConfig | None = None) -> None:
        super().__init__(local=local)
        self.face = face or FaceConfig()

    def face_config(self, client_id: str) -> FaceConfig:
        """The face settings sent to ``client_id`` (the same for every party here)."""
        return self.face

    def client_config(self, rnd: int, client_id: str) -> dict[str, Any]:
        return {"face": self.face_config(client_id).to_dict()}

    def configure_evaluate(self, round: int, state: ServerState, client_ids: Sequence[str]) -> list[EvalTask]:
        tasks = super().configure_evaluate(round, state, client_ids)
        return [EvalTask(t.round, t.client_id, t.arrays, {**t.config, "face": self.face_config(t.client_id).to_dict()},
                         t.model_version) for t in tasks]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "face": self.face.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.face = FaceConfig.from_dict(state["face"])


class CodebookFedAvg(PrivateHeadFedAvg):
    """FedAvg of backbones where each party pins its people to secret rows of its own public codebook pool.

    ``pools`` is the most parties that will ever take part; each gets codebook_size // pools rows.
    """

    name = "codebook-fedavg"

    def __init__(self, local: LocalConfig | None = None, face: FaceConfig | None = None, pools: int = 1) -> None:
        if pools < 1:
            raise ConfigError(f"pools must be at least 1 (one per party), got {pools}")
        super().__init__(local, replace(face or FaceConfig(), templates="codebook", pools=pools))
        self.pool_of: dict[str, int] = {}

    def face_config(self, client_id: str) -> FaceConfig:
        if client_id not in self.pool_of:
            if len(self.pool_of) >= self.face.pools:
                raise ConfigError(f"all {self.face.pools} codebook pools are taken, so {client_id} cannot join; "
                                  "create the strategy with pools >= the number of parties")
            self.pool_of[client_id] = len(self.pool_of)
        return replace(self.face, pool=self.pool_of[client_id])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pool_of": dict(self.pool_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pool_of = {str(k): int(v) for k, v in state["pool_of"].items()}
