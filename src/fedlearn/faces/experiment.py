"""One face-recognition training run of any kind (federated, one party, centralized) on the one round loop.

Every method trains the same backbone with the same recipe through RoundLoop, InProcessRuntime and
PrivateHeadTrainer; they differ only in who holds which people and in the strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.errors import ConfigError
from fedlearn.faces.config import FaceConfig
from fedlearn.faces.data import FaceImages
from fedlearn.faces.evaluate import open_set_report
from fedlearn.faces.model import FaceEmbeddingNet
from fedlearn.faces.split import IdentitySplit, local_dataset, party_client_data
from fedlearn.faces.strategy import CodebookFedAvg, PrivateHeadFedAvg
from fedlearn.faces.trainer import PrivateHeadTrainer
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.base import Runtime
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop

METHODS: dict[str, str] = {
    "centralized": "one trainer holds every training person (learned head, upper reference)",
    "single-party": "party 0 alone, its own people only (learned head)",
    "fedavg": "FedAvg of backbones, private learned heads, no correction (baseline)",
    "codebook": "FedAvg of backbones, private rows of a public codebook, other pools as negatives (ours)",
    "codebook-own-rows": "as codebook, but only the party's own rows in the softmax (ablation)",
}


@dataclass(frozen=True)
class FaceRunSettings:
    """The recipe shared by every method; ``rounds * local_epochs`` epochs of each party's data in total."""

    rounds: int = 60
    local_epochs: int = 1
    lr: float = 0.05
    warmup_rounds: int = 5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    embedding_dim: int = 128
    width: int = 16
    face: FaceConfig = field(default_factory=FaceConfig)
    gallery_per_identity: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clients(method: str, images: FaceImages, split: IdentitySplit) -> dict[str, ClientData]:
    if method == "centralized":
        return {"central": ClientData(train=local_dataset(images, split.training))}
    if method == "single-party":
        return {"party-0": ClientData(train=local_dataset(images, split.parties[0]))}
    return party_client_data(images, split)


def _strategy(method: str, settings: FaceRunSettings, parties: int) -> PrivateHeadFedAvg:
    local = LocalConfig(local_epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                        momentum=settings.momentum, weight_decay=settings.weight_decay)
    learned = replace(settings.face, templates="learned")
    if method in ("centralized", "single-party", "fedavg"):
        return PrivateHeadFedAvg(local, learned)
    if method in ("codebook", "codebook-own-rows"):
        face = replace(settings.face, cross_pool_negatives=method == "codebook")
        return CodebookFedAvg(local, face, pools=parties)
    raise ConfigError(f"unknown face method {method!r}; choose one of: {', '.join(METHODS)}")


def scheduled_lr(base_lr: float, round: int, rounds: int, warmup: int) -> float:
    """Local learning rate for ``round`` (1-based): linear warm-up over ``warmup`` rounds, then a cosine to 0."""
    if round <= warmup:
        return base_lr * round / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (round - 1 - warmup) / max(rounds - warmup, 1)))


def lr_schedule(strategy: PrivateHeadFedAvg, settings: FaceRunSettings) -> Callable[[dict[str, Any]], None]:
    """Set round 1's learning rate now and return the round callback that sets each following round's."""
    strategy.set_local(lr=scheduled_lr(settings.lr, 1, settings.rounds, settings.warmup_rounds))

    def step(row: dict[str, Any]) -> None:
        strategy.set_local(lr=scheduled_lr(settings.lr, row["round"] + 1, settings.rounds, settings.warmup_rounds))

    return step


def run_method(method: str, images: FaceImages, split: IdentitySplit, settings: FaceRunSettings, seed: int,
               wrap_runtime: Callable[[Runtime], Runtime] | None = None) -> dict[str, Any]:
    """Train with ``method`` on the split's training people and score the backbone on the held-out people."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same initial backbone for every method of a seed
    backbone = FaceEmbeddingNet(settings.embedding_dim, settings.width)
    clients = _clients(method, images, split)
    strategy = _strategy(method, settings, len(split.parties))
    trainer = PrivateHeadTrainer(backbone, device="cpu", secret=seed)
    runtime: Runtime = InProcessRuntime(ClientApp(trainer, clients))
    if wrap_runtime is not None:
        runtime = wrap_runtime(runtime)
    vector = ModelVector(FaceEmbeddingNet(settings.embedding_dim, settings.width))
    vector.load(ModelVector(backbone).read())
    strategy.sampler.min_clients = len(clients)
    loop = RoundLoop(strategy, runtime, vector.spec, vector.read(), min_clients=len(clients), seed=seed,
                     callbacks=[lr_schedule(strategy, settings)])
    history = loop.run(settings.rounds)
    vector.load(loop.weights)  # the server's copy: the clients' trainer model is not touched
    report = open_set_report(vector.module, images.select(list(split.held_out)), settings.gallery_per_identity, seed)
    return {
        "method": method,
        "seed": seed,
        "train_people": sum(int(torch.unique(c.train.y).numel()) for c in clients.values()),
        "train_photos": sum(len(c.train) for c in clients.values()),
        "final_train_loss": history[-1]["train_loss"],
        "seconds": time.perf_counter() - start,
        "bytes_up": sum(r["bytes_up"] for r in history),
        **report,
    }
