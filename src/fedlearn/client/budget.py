"""A client's own privacy budget under local DP or DP-SGD: its accountant over its own releases, and a refusal.

The server is the party local DP and DP-SGD protect against, so the server cannot be the one to stop: each client
counts what it released (in privacy counters of its state, which a checkpoint fallback never rolls back) and
refuses the task that would take its own epsilon past its budget (``--client-budget``, from its own config).
Under local DP a round is one Gaussian release of noise multiplier z/2 on sensitivity 2C (replace-one), with no
amplification: the client knows it took part. Under distributed DP a round is the client's own noise share alone (a
discrete Gaussian: the same zCDP as a Gaussian), at the least share its policy accepts, as if every other share were
known to the server. Under DP-SGD a round is E * round(n/B) Poisson-sampled steps at
rate B/n and noise multiplier z, as the DP-SGD hook counts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlearn.client.state import DISTRIBUTED_DP_RELEASES, LOCAL_DP_RELEASES
from fedlearn.errors import TaskRefused
from fedlearn.protocol.messages import TrainTask

MODES = ("local", "dpsgd", "distributed")
COUNTERS = {"local": LOCAL_DP_RELEASES, "dpsgd": "dpsgd_steps", "distributed": DISTRIBUTED_DP_RELEASES}
PER_ROUND = ("local", "distributed")  # one Gaussian release per round, replace-one, no amplification


class BudgetSpent(TaskRefused):
    """The task would take this client's epsilon past its own budget: refused, as any task against its policy (a
    simulation records the client as failed for the round and runs on)."""


@dataclass(frozen=True)
class ClientBudget:
    """``epsilon`` at ``delta`` for a client training with ``mode`` DP at ``noise_multiplier``."""

    epsilon: float
    delta: float
    mode: str
    noise_multiplier: float
    accountant: str = "rdp"
    target_epsilon: float | None = None  # dpsgd: the noise is calibrated to it from the client's data size
    rounds: int = 1

    def releases(self, task: TrainTask, num_examples: int) -> tuple[float, int]:
        """(sampling rate, count) of the releases one round of ``task`` makes."""
        if self.mode in PER_ROUND:
            return 1.0, 1
        from fedlearn.privacy.dpsgd import steps_per_round

        batch, epochs = int(task.config["batch_size"]), int(task.config["local_epochs"])
        return min(1.0, batch / max(num_examples, 1)), steps_per_round(num_examples, batch, epochs)

    def spent(self, state: Mapping[str, torch.Tensor]) -> int:
        """Releases already made, from the client's privacy counter."""
        value = state.get(COUNTERS[self.mode])
        return int(value) if value is not None else 0

    def noise(self, task: TrainTask, num_examples: int) -> float:
        """The noise multiplier this client's releases carry: the configured one, or (DP-SGD with a target) the one
        its hook calibrates from its data size."""
        if self.mode != "dpsgd" or self.target_epsilon is None:
            return self.noise_multiplier
        from fedlearn.privacy.dpsgd import calibrated_noise

        return calibrated_noise(self.target_epsilon, num_examples, int(task.config["batch_size"]),
                                int(task.config["local_epochs"]), self.rounds, self.delta, self.accountant)

    def epsilon_after(self, sampling_rate: float, count: int, noise_multiplier: float | None = None) -> float:
        from fedlearn.privacy.accountant import PrivacyAccountant  # dp-accounting only under DP

        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        z = z / 2 if self.mode in PER_ROUND else z
        return PrivacyAccountant(noise_multiplier=z, sampling_rate=sampling_rate, delta=self.delta,
                                 kind=self.accountant).epsilon_after(count)

    def admit(self, task: TrainTask, num_examples: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The privacy counters after this round, or BudgetSpent when the round would exceed the budget."""
        rate, count = self.releases(task, num_examples)
        total = self.spent(state) + count
        after = self.epsilon_after(rate, total, self.noise(task, num_examples))
        if after > self.epsilon:
            raise BudgetSpent(f"client {task.client_id}: round {task.round} would take its epsilon to {after:.3g}, "
                              f"past its own budget {self.epsilon:g} (--client-budget); it takes no more training "
                              "tasks in this run")
        return {COUNTERS[self.mode]: torch.tensor(total, dtype=torch.int64)} if self.mode in PER_ROUND else {}
