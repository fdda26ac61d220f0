"""Client side of federated face recognition: the backbone is federated, each party's identity head is not.

``PrivateHeadTrainer`` answers the same TrainTask/EvalTask messages as LocalTrainer (so any runtime
can drive it), but its model is only the embedding backbone: the task's vector and the returned
update cover the backbone alone. Each party's classifier is personal state in its client state store
(``personal/head.*``): checkpointed with a simulation, in the party's own folder when deployed, never sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.batches import iter_batches
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalOutcome, LocalTrainer
from fedlearn.data.arrays import as_tensors
from fedlearn.errors import ConfigError, DataError
from fedlearn.faces.augment import augment_faces
from fedlearn.faces.config import FaceConfig
from fedlearn.faces.margin import cosine_logits, margin_cross_entropy
from fedlearn.faces.templates import PrivateHead, head_from_state, head_state, public_codebook
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalTask, TrainTask


def local_labels(dataset: Dataset, client_id: str) -> torch.Tensor:
    """A party's labels, which must be its own numbering 0..people-1 with every number used."""
    tensors = as_tensors(dataset)
    labels = tensors[1].long() if tensors is not None else torch.as_tensor([int(dataset[i][1]) for i in
                                                                            range(len(dataset))])
    if len(labels) == 0:
        raise DataError(f"client {client_id} has no face photos; give every party data")
    people = int(labels.max()) + 1
    if int(labels.min()) < 0 or torch.unique(labels).numel() != people:
        raise DataError(f"client {client_id}'s labels must number its people 0..{people - 1} with none skipped; "
                        "relabel them with fedlearn.faces.split.local_dataset")
    return labels


class PrivateHeadTrainer(LocalTrainer):
    """Trains the shared embedding backbone with CosFace against each party's private identity head."""

    def __init__(self, backbone: nn.Module, device: str | torch.device | None = None, secret: int = 0) -> None:
        super().__init__(backbone, device)
        self.secret = secret  # seeds new heads; stays on the client side
        self.embedding_dim = int(getattr(backbone, "embedding_dim", 0))
        self._codebooks: dict[tuple[int, int, int], torch.Tensor] = {}

    def fit(self, task: TrainTask, data: ClientData, hooks=(), state=None) -> LocalOutcome:
        """Train backbone and private head locally; return only the backbone's update."""
        cfg = LocalConfig.from_dict(task.config)
        face = FaceConfig.from_dict(task.config.get("face", {}))
        unsupported = sorted(set(task.config.get("hooks", {})) - {"prox"})
        if cfg.mode != "delta" or unsupported:
            raise ConfigError("face training supports update (delta) mode with the prox hook only; use FedAvg-style "
                              "rounds, with clipping and local noise for client-level DP")
        labels = local_labels(data.train, task.client_id)
        head = head_from_state(state or {}, task.client_id, int(labels.max()) + 1, self._dim(data.train), face,
                               self.secret)
        weight = head.weight.to(self.device).clone().requires_grad_(True) if head.mode == "learned" else None

        def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            templates, column = self._templates(face, head, weight, training=True)
            targets = y if column is None else column[y]
            return margin_cross_entropy(self.model(x), templates, targets, face.scale, face.margin)

        outcome = super().fit(task, data, hooks, state, objective=objective,
                              extra_params=[weight] if weight is not None else [],
                              augment=augment_faces if face.augment else None)
        if weight is not None:
            head.weight = weight.detach().to("cpu")
        outcome.state = {**outcome.state, **head_state(head)}
        return outcome

    def _dim(self, dataset: Dataset) -> int:
        if not self.embedding_dim:
            x, _ = next(iter_batches(dataset, 1, shuffle=False, device=self.device))
            with torch.no_grad():
                self.embedding_dim = int(self.model(x).shape[1])
        return self.embedding_dim

    def _codebook(self, face: FaceConfig, dim: int) -> torch.Tensor:
        key = (face.codebook_size or dim, dim, face.codebook_seed)
        if key not in self._codebooks:
            self._codebooks[key] = public_codebook(*key).to(self.device)
        return self._codebooks[key]

    def _templates(self, face: FaceConfig, head: PrivateHead, weight: torch.Tensor | None,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(templates, map from local label to template column) for the loss or for scoring own people."""
        if head.mode == "learned":
            return weight, None
        codebook = self._codebook(face, self.embedding_dim)
        rows = head.rows.to(self.device)
        if training and face.cross_pool_negatives:
            return codebook, rows
        return codebook[rows], None

    @torch.no_grad()
    def evaluate(self, task: EvalTask, data: ClientData, state=None) -> tuple[int, dict[str, float]]:
        """Closed-set accuracy among the party's own people, scored with its private head (never sent)."""
        face = FaceConfig.from_dict(task.config.get("face", {}))
        dataset = data.test
        if dataset is None or len(dataset) == 0:  # as in every trainer: no test data, no score
            return 0, {}
        self.vector.load(task.weights.to(self.device))
        if not any(k.startswith("personal/head.") for k in (state or {})):
            raise ConfigError(f"{task.client_id} has no identity head yet; train it for a round before evaluating")
        head = head_from_state(state, task.client_id, int(local_labels(data.train, task.client_id).max()) + 1,
                               self._dim(data.train), face, self.secret)
        weight = head.weight.to(self.device) if head.weight is not None else None
        templates, _ = self._templates(face, head, weight, training=False)
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in iter_batches(dataset, LocalConfig.from_dict(task.config).eval_batch_size, shuffle=False,
                                 device=self.device):
            cos = cosine_logits(self.model(x), templates)
            loss_sum += float(F.cross_entropy(face.scale * cos, y, reduction="sum"))
            correct += int((cos.argmax(dim=1) == y).sum())
            n += y.shape[0]
        return n, {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}
