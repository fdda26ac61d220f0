"""Local training and evaluation on one reused model: the client side of every round."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.batches import iter_batches
from fedlearn.client.config import LocalConfig
from fedlearn.client.data import ClientData
from fedlearn.client.dpsgd import poisson_batches, private_gradients
from fedlearn.errors import ConfigError, DataError
from fedlearn.metrics import BinaryScores
from fedlearn.privacy.dp import clip_by_norm, gaussian_noise, noise_generator
from fedlearn.protocol.messages import EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.protocol.params import ModelVector


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


class LocalTrainer:
    """Runs any client's local work on one model instance, so memory does not grow with clients."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.vector = ModelVector(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    def fit(self, task: TrainTask, data: ClientData) -> TrainResult:
        """Answer a TrainTask: an update (``delta`` mode) or a full-batch gradient (``gradient`` mode)."""
        cfg = LocalConfig.from_dict(task.config)
        if len(data.train) == 0:
            raise DataError(f"client {task.client_id} has no training samples; give every client data")
        seed_torch(cfg.seed, self.device)
        self.vector.load(task.weights.to(self.device))
        if cfg.mode == "gradient":
            update, loss, n = self._full_gradient(data.train, cfg)
        else:
            loss, n = self._train(data, cfg)
            update = self.vector.read().sub_(task.weights)
        return privatized_result(task, update, n, loss, cfg)

    def _train(self, data: ClientData, cfg: LocalConfig) -> tuple[float, int]:
        model = self.model
        model.train()
        optimizer = torch.optim.SGD(
            self._params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        anchor = [p.detach().clone() for p in self._params] if cfg.mu > 0 else None
        generator = torch.Generator().manual_seed(cfg.seed)
        batch_size = data.batch_size or cfg.batch_size
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        if cfg.dpsgd_clip > 0:
            batches = poisson_batches(data.train, batch_size, cfg.local_epochs, generator, self.device)
            noise = noise_generator(cfg.noise_seed)
        else:
            batches = (b for _ in range(cfg.local_epochs)
                       for b in iter_batches(data.train, batch_size, shuffle=True, generator=generator,
                                             device=self.device))
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            if cfg.dpsgd_clip > 0:
                loss = torch.tensor(private_gradients(
                    model, x, y, clip_norm=cfg.dpsgd_clip, noise_multiplier=cfg.dpsgd_noise,
                    expected_batch=min(batch_size, len(data.train)), generator=noise) / max(len(y), 1))
            else:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            if anchor is not None:
                # FedProx: gradient of mu/2 * ||w - w_global||^2 added to the data loss's.
                for p, p0 in zip(self._params, anchor):
                    p.grad.add_(p.detach() - p0, alpha=cfg.mu)
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
        return float(loss_sum) / max(seen, 1), len(data.train)

    def _full_gradient(self, dataset: Dataset, cfg: LocalConfig) -> tuple[torch.Tensor, float, int]:
        """Gradient of the mean loss over all local samples at the current weights (chunked)."""
        model = self.model
        model.train()
        model.zero_grad(set_to_none=True)
        n = len(dataset)
        loss_sum = torch.zeros((), device=self.device)
        for x, y in iter_batches(dataset, cfg.eval_batch_size, shuffle=False, device=self.device):
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (loss / n).backward()
            loss_sum += loss.detach()
        grads = self.vector.read_grad()
        model.zero_grad(set_to_none=True)
        return grads, float(loss_sum) / n, n

    def evaluate(self, task: EvalTask, data: ClientData) -> EvalResult:
        """Loss and accuracy of the task's weights on the client's test data.

        For a two-output model the metrics also carry confusion counts and a margin histogram,
        which the server sums exactly across clients (``fedlearn.metrics.pool_federated``).
        """
        cfg = LocalConfig.from_dict(task.config)
        dataset = data.test if data.test is not None else data.train
        self.vector.load(task.weights.to(self.device))
        scores = BinaryScores()
        loss, accuracy, n = evaluate_model(self.model, dataset, self.device, cfg.eval_batch_size, scores=scores)
        return EvalResult(task.round, task.client_id, n, loss, accuracy, scores.federated_payload())


def privatized_result(task: TrainTask, update: torch.Tensor, n: int, loss: float, cfg: LocalConfig) -> TrainResult:
    """The client-side transforms every trainer applies: delta -> clip -> local noise -> payload."""
    metrics = {"train_loss": loss}
    payload = update
    if cfg.clip_norm > 0:
        payload, norm = clip_by_norm(update, cfg.clip_norm)
        metrics["below_clip"] = float(norm <= cfg.clip_norm)  # for adaptive clipping's quantile estimate
    if cfg.local_noise_std > 0:
        generator = noise_generator(cfg.noise_seed)
        payload = (payload.double() + gaussian_noise(payload.numel(), cfg.local_noise_std, generator)).float()
        metrics.pop("below_clip", None)  # an untrusted server learns nothing beyond the noised update
    return TrainResult(task.round, task.client_id, n, payload, metrics)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
    *, scores: BinaryScores | None = None,
) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy and sample count of ``model`` on ``dataset``.

    ``scores``, when given, also sees every batch's logits and labels (for binary-task metrics).
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for x, y in iter_batches(dataset, batch_size, shuffle=False, device=device):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        n += y.shape[0]
        if scores is not None:
            scores.update(logits, y)
    if n == 0:
        return 0.0, 0.0, 0
    return float(loss_sum) / n, int(correct) / n, n
