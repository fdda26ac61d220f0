"""`FedServer`: the seed document's server; each `train()` call runs one federated round."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.app import ClientApp
from fedlearn.client.trainer import LocalTrainer
from fedlearn.core.client import FedClient
from fedlearn.errors import ConfigError
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ParamSpec, same_architecture
from fedlearn.registry import lookup
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.evaluation import CentralEvaluator
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import Strategy
from fedlearn.strategies.base import Sampler
from fedlearn.strategies.dp import DPSGD


class FedServer:
    """Coordinates FedClients in this process with FedAvg (or another strategy).

    The global model starts from the first client's weights. ``train`` runs one round,
    ``evaluate`` returns the global model's accuracy over the clients' test sets. A strategy given
    by name samples ``fraction`` of the clients per round; a strategy instance brings its own sampler
    (the one its privacy accountant reads), and a ``fraction`` that disagrees with it is refused.
    """

    def __init__(
        self,
        clients: Sequence[FedClient],
        strategy: str | Strategy = "fedavg",
        fraction: float | None = None,
        seed: int = 0,
        min_clients: int = 1,
        test_dataset: Dataset | None = None,
    ) -> None:
        clients = list(clients)
        if not clients:
            raise ConfigError("FedServer needs at least one FedClient")
        ids = [c.client_id if c.client_id is not None else f"client-{i}" for i, c in enumerate(clients)]
        if len(set(ids)) != len(ids):
            raise ConfigError("FedClient client_id values must be unique")
        if not 1 <= min_clients <= len(clients):
            raise ConfigError(f"min_clients must be between 1 and the {len(clients)} clients, got {min_clients}")
        model = clients[0].model
        spec = ParamSpec.from_module(model)
        for cid, client in zip(ids, clients):
            same_architecture(spec, ParamSpec.from_module(client.model), f"client {cid}'s model")
        self.clients = dict(zip(ids, clients))
        if isinstance(strategy, str):
            self.strategy = lookup("strategy", strategy)(local=LocalConfig(),
                                                         sampler=Sampler(1.0 if fraction is None else fraction,
                                                                         min_clients))
        else:
            self.strategy = strategy
            if fraction is not None and abs(strategy.sampler.rate - fraction) > 1e-12:
                raise ConfigError(f"the strategy samples clients at rate {strategy.sampler.rate:g}, which its privacy "
                                  f"accounting reads; fraction={fraction:g} disagrees: leave fraction out")
        first = clients[0]
        self._trainer = LocalTrainer(model, first.device, task=first.task, loss=first.loss)
        evaluator = None
        if test_dataset is not None:
            evaluator = CentralEvaluator(copy.deepcopy(model), test_dataset, self._trainer.device, task=first.task)
        self.app = ClientApp(self._trainer, {cid: c.data() for cid, c in self.clients.items()})
        if isinstance(self.strategy, DPSGD) and self.strategy.counts is None:  # a simulation knows its clients' data
            self.strategy.counts = {cid: (len(d.train), d.batch_size or self.strategy.local.batch_size)
                                    for cid, d in self.app.clients.items()}
        self.loop = RoundLoop(
            self.strategy,
            InProcessRuntime(self.app),
            spec,
            self._trainer.vector.read(),
            min_clients=min_clients,
            seed=seed,
            evaluator=evaluator,
            client_state=self.app.state,
        )

    def train(self, num_epochs: int = 1, lr: float = 0.01, **local: Any) -> dict[str, Any]:
        """Run one round: sampled clients train ``num_epochs`` epochs at ``lr``; returns the round's metrics.

        Extra keywords (``momentum``, ``weight_decay``, ``mu``) set the other local
        hyper-parameters for this and later rounds; batch sizes belong to each FedClient.
        """
        if num_epochs < 1 or lr <= 0:
            raise ConfigError(f"train needs num_epochs >= 1 and lr > 0, got num_epochs={num_epochs}, lr={lr}")
        if "batch_size" in local:
            raise ConfigError("batch_size is set per client: FedClient(..., batch_size=N)")
        if "mu" in local:  # FedProx's coefficient belongs to the strategy's own config
            mu = local.pop("mu")
            if "mu" not in getattr(self.strategy.config, "__dataclass_fields__", {}):
                raise ConfigError(f"mu is FedProx's setting; strategy {self.strategy.name} has none")
            config = replace(self.strategy.config, mu=mu)
            config.validate()  # before it is kept: a refused mu must not reach the next round's clients
            self.strategy.config = config
        self.strategy.set_local(local_epochs=num_epochs, lr=lr, **local)
        row = self.loop.run_round()
        self._trainer.vector.load(self.loop.weights)
        return row

    def evaluate(self) -> float:
        """Accuracy of the global model in [0, 1]: sample-weighted over clients' test sets.

        Without any client test set, the server's own ``test_dataset`` is used.
        """
        if any(c.test_dataset is not None for c in self.clients.values()):
            result = self.loop.evaluate_federated()
            self._trainer.vector.load(self.loop.weights)
            return float(result["accuracy"])
        if self.loop.evaluator is None:
            raise ConfigError("no test data: give FedClients a test_dataset or FedServer a test_dataset")
        return float(self.loop.evaluator.score(self.loop.weights)["accuracy"])

    @property
    def model(self) -> nn.Module:
        """The first client's model instance holding the current global weights."""
        self._trainer.vector.load(self.loop.weights)
        return self._trainer.model

    @property
    def weights(self) -> torch.Tensor:
        """The global weights as a flat vector."""
        return self.loop.weights

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.loop.history
