"""Local training and evaluation on one reused model: one SGD loop with hook points, any loss and task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.batches import iter_batches
from fedlearn.client.data import ClientData
from fedlearn.client.hooks import HookContext, ParamLayout, TrainHook
from fedlearn.errors import ConfigError, DataError
from fedlearn.metrics import BinaryScores
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Arrays, EvalTask, TrainTask
from fedlearn.protocol.params import ModelVector, is_personal
from fedlearn.tasks import SUM_PREFIX, Task, get_task

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> mean loss
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto; got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    return resolved


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global RNG for model randomness (dropout) in this client's work.

    On the CPU only the CPU generator is set: ``torch.manual_seed`` on a CUDA build also queues
    a lazy CUDA seed with a stack trace, ~200 us per call, a measurable share of a small round.
    """
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@dataclass
class LocalOutcome:
    """What local training produced, before the client's transforms: arrays, count, metrics, new state."""

    arrays: Arrays
    num_examples: int
    metrics: dict[str, float]
    state: Arrays


class LocalTrainer:
    """Runs any client's local work on one model instance, so memory does not grow with clients.

    ``task`` says what the model predicts (classification, multilabel, regression) and so the
    default loss and the metrics; ``loss`` replaces the training loss (any callable of
    (outputs, targets) giving a mean). ``personal`` names personal layers by state_dict-name
    patterns (``fc2.*``): they are not in the federated vector, never leave the client, and live in
    its state store (``personal/<name>``), starting from this model's initial values.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, *,
                 task: str | Task = "classification", loss: Loss | None = None,
                 personal: Sequence[str] = ()) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.personal = tuple(personal)
        self.vector = ModelVector(self.model, self.personal)
        state = self.model.state_dict(keep_vars=True)
        self._personal = {n: t for n, t in state.items() if is_personal(n, self.personal)}
        if self.personal and not self._personal:
            raise ConfigError(f"--personal-layers {','.join(self.personal)} matches no entry of the model; names "
                              f"look like {', '.join(list(state)[:3])}")
        self._personal_init = {n: t.detach().to("cpu").clone() for n, t in self._personal.items()}
        self.task = get_task(task) if isinstance(task, str) else task
        if loss is not None and not callable(loss):
            raise ConfigError(f"loss must be callable on (outputs, targets), e.g. torch.nn.MSELoss(); got {loss!r}")
        self.loss: Loss = loss if loss is not None else self.task.loss
        named = dict(self.model.named_parameters())
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        personal_ids = {id(t) for t in self._personal.values()}
        self._shared = [p for p in self._params if id(p) not in personal_ids]  # what hooks adjust
        self.layout = self._layout(named)

    def _layout(self, named: dict[str, nn.Parameter]) -> ParamLayout:
        spec = self.vector.spec
        offsets, start = {}, 0
        for name, n in zip(spec.names, spec.numels):
            offsets[name] = (start, start + n)
            start += n
        by_id = {id(p): name for name, p in named.items()}
        names = [by_id[id(p)] for p in self._shared]
        missing = [n for n in names if n not in offsets]
        if missing:
            raise ConfigError(f"parameter {missing[0]!r} is not in the model's state_dict; FedLearn federates "
                              "state_dict entries")
        return ParamLayout(names, [offsets[n] for n in names], [p.shape for p in self._shared], spec.numel)

    def _load_personal(self, state: Mapping[str, torch.Tensor]) -> None:
        """This client's personal layers into the shared model instance (its stored ones, or the initial ones)."""
        with torch.no_grad():
            for name, tensor in self._personal.items():
                tensor.copy_(state.get(f"personal/{name}", self._personal_init[name]).to(tensor.device))

    def _personal_state(self) -> Arrays:
        return {f"personal/{n}": t.detach().to("cpu").clone() for n, t in self._personal.items()}

    def fit(self, task: TrainTask, data: ClientData, hooks: Sequence[TrainHook] = (),
            state: Mapping[str, torch.Tensor] | None = None, *, objective: Objective | None = None,
            extra_params: Sequence[torch.Tensor] = (), augment: Augment | None = None) -> LocalOutcome:
        """Local work for ``task``: ``update`` = new - global (``delta`` mode) or ``gradient`` (FedSGD).

        An application with its own objective (the face trainer's margin loss against a private head)
        passes ``objective(x, y) -> mean loss``, the extra tensors it trains (``extra_params``, never sent)
        and a batch ``augment(x, generator)``; the loop, the hooks and the update stay this one.
        """
        cfg = LocalConfig.from_dict(task.config)
        if len(data.train) == 0:
            raise DataError(f"client {task.client_id} has no training samples; give every client data")
        seed_torch(cfg.seed, self.device)
        weights = task.weights
        self.vector.load(weights.to(self.device))
        state = state or {}
        if self._personal:
            self._load_personal(state)
        if cfg.mode == "gradient":
            gradient, loss, n = self._full_gradient(data.train, cfg)
            return LocalOutcome({"gradient": gradient}, n, {"train_loss": loss}, {})
        ctx = HookContext(task, cfg, state, self.layout, self.device,
                          [p.detach().clone() for p in self._shared] if hooks else [])
        for hook in hooks:
            hook.begin(ctx)
        loss = self._train(data, cfg, hooks, ctx, objective, extra_params, augment)
        ctx.num_examples = len(data.train)
        for hook in hooks:
            hook.end(ctx, self._shared)
        update = self.vector.delta(weights)
        if self._personal:
            ctx.new_state.update(self._personal_state())
        return LocalOutcome({"update": update, **ctx.uplink}, len(data.train), {"train_loss": loss, **ctx.metrics},
                            dict(ctx.new_state))

    def _train(self, data: ClientData, cfg: LocalConfig, hooks: Sequence[TrainHook], ctx: HookContext,
               objective: Objective | None = None, extra_params: Sequence[torch.Tensor] = (),
               augment: Augment | None = None) -> float:
        model = self.model
        model.train()
        optimizer = torch.optim.SGD([*self._params, *extra_params], lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed)
        batch_size = data.batch_size or cfg.batch_size
        targets = self.task.targets
        batches = None
        for hook in hooks:
            batches = hook.batches(ctx, data.train, batch_size) or batches
        if batches is None:
            batches = chain.from_iterable(
                iter_batches(data.train, batch_size, shuffle=True, generator=generator, device=self.device,
                             targets=targets) for _ in range(cfg.local_epochs))
        backward = [h for h in hooks if type(h).backward is not TrainHook.backward]
        adjusting = [h for h in hooks if type(h).grads is not TrainHook.grads]
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        for x, y in batches:
            if augment is not None:
                x = augment(x, generator)
            optimizer.zero_grad(set_to_none=True)
            if backward:
                loss_sum += backward[0].backward(ctx, model, x, y, self.loss)
            else:
                loss = objective(x, y) if objective is not None else self.loss(model(x), y)
                loss.backward()
                loss_sum += loss.detach() * y.shape[0]
            if adjusting:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._shared]
                for hook in adjusting:
                    grads = hook.grads(ctx, self._shared, grads)
                for p, g in zip(self._shared, grads):
                    p.grad = g
            optimizer.step()
            ctx.steps += 1
            seen += y.shape[0]
        return float(loss_sum) / max(seen, 1)

    def _full_gradient(self, dataset: Dataset, cfg: LocalConfig) -> tuple[torch.Tensor, float, int]:
        """Gradient of the mean loss over all local samples at the current weights (chunked)."""
        model = self.model
        model.train()
        model.zero_grad(set_to_none=True)
        n = len(dataset)
        loss_sum = torch.zeros((), device=self.device)
        for x, y in iter_batches(dataset, cfg.eval_batch_size, shuffle=False, device=self.device,
                                 targets=self.task.targets):
            loss = self.loss(model(x), y) * y.shape[0]
            (loss / n).backward()
            loss_sum += loss.detach()
        grads = self.vector.read_grad()
        model.zero_grad(set_to_none=True)
        return grads, float(loss_sum) / n, n

    def evaluate(self, task: EvalTask, data: ClientData,
                 state: Mapping[str, torch.Tensor] | None = None) -> tuple[int, dict[str, float]]:
        """(examples, metrics) of the task's weights (with this client's personal layers) on its test data;
        (0, {}) without any."""
        if data.test is None or len(data.test) == 0:
            return 0, {}
        self.vector.load(task.weights.to(self.device))
        if self._personal:
            self._load_personal(state or {})
        batch_size = LocalConfig.from_dict(task.config).eval_batch_size
        return evaluate_model(self.model, data.test, self.device, batch_size, task=self.task)


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512, *,
                   task: Task | str = "classification", pooled: bool = True) -> tuple[int, dict[str, float]]:
    """(examples, metrics) of ``model`` on ``dataset`` for ``task``. A two-output classifier also gets the
    exact binary-task metrics, or with ``pooled`` (a client's answer) the confusion counts and margin
    histogram that federated evaluation sums exactly."""
    task = get_task(task) if isinstance(task, str) else task
    model.eval()
    scores = task.scores()
    binary = BinaryScores() if task.name == "classification" else None
    n = 0
    for x, y in iter_batches(dataset, batch_size, shuffle=False, device=device, targets=task.targets):
        outputs = model(x)
        scores.update(outputs, y)
        if binary is not None:
            binary.update(outputs, y)
        n += y.shape[0]
    if n == 0:
        return 0, {}
    metrics = {k: v for k, v in scores.metrics().items() if v is not None}
    if pooled:  # the task's additive sums, which the server pools exactly (multilabel AUC from histograms)
        metrics.update({f"{SUM_PREFIX}{task.name}.{k}": v for k, v in scores.sums().items()})
    if binary is not None:
        metrics.update(binary.federated_payload() if pooled else
                       {k: v for k, v in binary.metrics().items() if v is not None})
    return n, metrics
