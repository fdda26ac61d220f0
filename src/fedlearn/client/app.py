"""The one client entry point: every runtime hands a ClientApp its tasks, so a task gets the same answer
in-process, over gRPC and on any later runtime.

A train task runs in three parts: *prepare* (the client's data, state and the hooks the task asks
for), the *step* (local SGD with the hooks' pure gradient maths, in ``LocalTrainer``) and *finish*
(the update, the client's transforms in order, masking or encryption last, and the new client
state). Privacy transforms are the client's own decision: a task may request them, the client's
``ClientPolicy`` adds what it requires and refuses a request weaker than its policy. Privacy noise
comes from the OS's CSPRNG unless the simulation-only ``seeded_privacy`` seed is set.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlearn.client.budget import ClientBudget
from fedlearn.client.data import ClientData
from fedlearn.client.hooks import TrainHook, build_hooks
from fedlearn.client.secure import SecureClients
from fedlearn.client.state import VERSIONS_KEPT, ClientStateStore
from fedlearn.client.trainer import LocalTrainer
from fedlearn.errors import InvalidUpdateError, TaskRefused
from fedlearn.privacy.distributed import SharePolicy
from fedlearn.privacy.dp import PrivacyRandom
from fedlearn.protocol.messages import EvalResult, EvalTask, Message, SecureTask, TrainResult, TrainTask
from fedlearn.seeding import derive_seed
from fedlearn.transforms.base import TransformContext, UpdateTransform, build_transforms

log = logging.getLogger(__name__)


UNNOISED_METRICS = ("train_loss",)  # what a DP client keeps from the server its noise protects it against


@dataclass
class ClientPolicy:
    """What a client requires whatever the server asks: privacy transforms and hooks with minimum settings."""

    transforms: list[UpdateTransform] = field(default_factory=list)
    hooks: dict[str, TrainHook] = field(default_factory=dict)
    withheld: tuple[str, ...] = ()  # metrics the client never sends (unnoised functions of its data)
    budget: ClientBudget | None = None  # the client's own epsilon budget (local DP, DP-SGD)
    count_withheld: bool = False  # send weight 1, not the example count (DP-SGD: the count is private)
    share: SharePolicy | None = None  # distributed DP: the least noise share and the largest clip it accepts

    def pipeline(self, requested: list[UpdateTransform]) -> list[UpdateTransform]:
        """The transforms to apply: the policy's, in the policy's order (a requested one of the same kind
        replaces it only if it is at least as strong, else the task is refused), then the other requested
        ones in their order, so anything a server adds is post-processing of the privatized update."""
        asked = {t.name: t for t in requested}
        own = []
        for mine in self.transforms:
            theirs = asked.get(mine.name)
            if theirs is not None and theirs.weaker_than(mine):
                raise TaskRefused(f"task asks for {theirs.request()}, weaker than this client's policy "
                                  f"{mine.request()}")
            own.append(theirs if theirs is not None else mine)
        names = {t.name for t in self.transforms}
        return [*own, *(t for t in requested if t.name not in names)]

    def train_hooks(self, requested: list[TrainHook]) -> list[TrainHook]:
        """The requested hooks, checked against the policy's; the policy's own are added when not requested."""
        names = {type(h).registered_name: h for h in requested}
        for name, own in self.hooks.items():
            asked = names.get(name)
            weaker = getattr(asked, "weaker_than", None)
            if asked is not None and weaker is not None and weaker(own):
                raise TaskRefused(f"task asks for hook {name} weaker than this client's policy")
            if asked is None:  # a copy per task: a hook keeps per-task state (its generator, batch sizes)
                requested = [*requested, copy.copy(own)]
        return requested


class ClientApp:
    """Answers tasks for the clients whose data it holds (one in a deployment, all in a simulation)."""

    def __init__(self, trainer: LocalTrainer, clients: Mapping[str, ClientData], *,
                 state: ClientStateStore | None = None, secure: SecureClients | None = None,
                 policy: ClientPolicy | None = None, seeded_privacy: int | None = None,
                 commit_state: bool = False) -> None:
        self.trainer = trainer
        self.clients = dict(clients)
        self.state = state if state is not None else ClientStateStore()
        self.secure = secure or SecureClients()
        self.policy = policy or ClientPolicy()
        self.seeded_privacy = seeded_privacy
        self.commit_state = commit_state  # a deployed client persists its state after every task

    def client_ids(self) -> list[str]:
        """The clients that can take part: those holding training data (a client without any is never sampled)."""
        return [cid for cid, data in self.clients.items() if len(data.train) > 0]

    def __call__(self, task: Message) -> Message:
        """The answer to one task; TaskRefused or another FedLearnError when the client will not answer."""
        if isinstance(task, TrainTask):
            return self.train(task)
        if isinstance(task, EvalTask):
            return self.evaluate(task)
        if isinstance(task, SecureTask):
            return self.secure.handle(task)
        raise InvalidUpdateError(f"server sent a {type(task).__name__}, not a task")

    def _data(self, client_id: str) -> ClientData:
        data = self.clients.get(client_id)
        if data is None:
            raise TaskRefused(f"task for client {client_id!r}, which this process does not host")
        return data

    def _seed(self, task: TrainTask, purpose: str) -> int:
        """A secret seed from the OS's CSPRNG, or under the simulation-only switch one derived from the run seed."""
        if self.seeded_privacy is None:
            return secrets.randbits(63)
        return derive_seed(self.seeded_privacy, task.round, task.client_id, purpose)

    def _generator(self, task: TrainTask, purpose: str) -> PrivacyRandom:
        """The client's privacy randomness: the OS's CSPRNG, or a seeded source under the simulation-only switch."""
        if self.seeded_privacy is None:
            return PrivacyRandom()
        return PrivacyRandom(self._seed(task, purpose))

    def prepare(self, task: TrainTask) -> tuple[ClientData, list[TrainHook], list[UpdateTransform]]:
        """The client's data and the hooks and transforms it will run for ``task`` (its policy applied)."""
        data = self._data(task.client_id)
        hooks = self.policy.train_hooks(build_hooks(task.config.get("hooks")))
        transforms = self.policy.pipeline(build_transforms(task.config.get("transforms")))
        for hook in hooks:
            if hasattr(hook, "attach"):
                hook.attach(self._generator(task, "hook-noise"))
        return data, hooks, transforms

    def train(self, task: TrainTask) -> TrainResult:
        """Prepare, train, finish: the result that leaves the client."""
        data, hooks, transforms = self.prepare(task)
        before = self.state.get(task.client_id, before=task.round)  # older if the server went back a checkpoint
        spent = self.policy.budget.admit(task, len(data.train), before) if self.policy.budget else {}
        outcome = self.trainer.fit(task, data, hooks, before)
        arrays, metrics = outcome.arrays, outcome.metrics
        ctx = TransformContext(task.client_id, task.round,
                               self._generator(task, "noise") if transforms else None)
        for transform in transforms:
            arrays = transform.client(arrays, metrics, ctx)
        metrics = {k: v for k, v in metrics.items() if k not in self.policy.withheld}
        count = 1 if self.policy.count_withheld else outcome.num_examples
        result = TrainResult(task.round, task.client_id, count, arrays, metrics, model_version=task.model_version)
        if "he" in task.config or "secagg" in task.config:
            result = self.secure.seal(task, result, self._rounding(task), self._generator(task, "share-noise"),
                                      self.policy.share)
        if outcome.state or spent:  # keys this round did not touch are kept
            self.state.put(task.client_id, {**before, **outcome.state, **spent}, task.round)
            if self.commit_state:
                self.state.commit()
                self.state.prune(latest=VERSIONS_KEPT)  # enough for a server that falls back to an older checkpoint
        return result

    def _rounding(self, task: TrainTask) -> np.random.Generator:
        # Stochastic rounding must be unbiased; its randomness is the client's, like its noise.
        return np.random.default_rng(self._seed(task, "secagg-rounding"))

    def evaluate(self, task: EvalTask) -> EvalResult:
        """The task's weights scored on the client's test data; a client without any answers with 0 examples."""
        state = self.state.get(task.client_id, before=task.round + 1)
        n, metrics = self.trainer.evaluate(task, self._data(task.client_id), state)
        return EvalResult(task.round, task.client_id, n, metrics)
