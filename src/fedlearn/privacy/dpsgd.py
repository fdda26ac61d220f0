"""Sample-level DP-SGD inside local training (Abadi et al., 2016), with torch.func per-example gradients.

Each step takes a Poisson sample of the client's examples (each with probability q = B / n, as
the accountant assumes), clips every example's gradient to L2 norm C, sums them, adds
N(0, (z C)^2) and divides by the expected batch size B. The ``dpsgd`` client hook runs it and
keeps the client's own accountant: the steps it actually ran, at the rate it actually used, are
stored in the client's state, where its own budget (``--client-budget``) turns them into its epsilon (the
mechanism feeds its accountant, as in Opacus). Nothing of it is sent: epsilon and steps are functions of n.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from fedlearn.client.hooks import HookContext, TrainHook
from fedlearn.data.arrays import as_tensors
from fedlearn.errors import ConfigError
from fedlearn.privacy.dp import PrivacyRandom
from fedlearn.registry import positive, register

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def poisson_batches(dataset: Dataset, batch_size: int, epochs: int, generator: PrivacyRandom,
                    device: torch.device, targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """epochs * round(n / B) batches, each example joining each batch with probability B / n."""
    tensors = as_tensors(dataset)
    if tensors is None:
        items = [dataset[i] for i in range(len(dataset))]
        tensors = torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])
    x, y = tensors[0], (targets or torch.Tensor.long)(tensors[1])
    n = y.shape[0]
    rate = min(1.0, batch_size / n)
    for _ in range(epochs * max(1, round(n / batch_size))):
        chosen = torch.nonzero(generator.uniform(n) < rate).flatten()  # CSPRNG coins: the batch stays secret
        yield x[chosen].to(device), y[chosen].to(device)


def steps_per_round(num_examples: int, batch_size: int, epochs: int) -> int:
    """How many DP-SGD steps (sampled Gaussian releases) one round of local training takes."""
    return epochs * max(1, round(num_examples / batch_size))


@functools.cache
def calibrated_noise(target_epsilon: float, num_examples: int, batch_size: int, epochs: int, rounds: int,
                     delta: float, kind: str) -> float:
    """The noise multiplier with which a client of ``num_examples`` examples stays within ``target_epsilon`` after
    DP-SGD in every one of ``rounds`` rounds (its own data size sets its rate B / n and its steps: Opacus'
    ``make_private_with_epsilon``, per client). Every round is assumed: a client cannot know how often it is sampled.
    """
    from fedlearn.privacy.accountant import calibrate_noise_multiplier  # dp_accounting only when DP-SGD runs

    return calibrate_noise_multiplier(target_epsilon, sampling_rate=min(1.0, batch_size / num_examples),
                                      steps=rounds * steps_per_round(num_examples, batch_size, epochs),
                                      delta=delta, kind=kind)


def private_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip_norm: float,
                      noise_multiplier: float, expected_batch: float, generator: PrivacyRandom,
                      loss: Loss) -> float:
    """Set each trainable parameter's .grad to the clipped, noised mean gradient; return the batch loss sum."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if x.shape[0] > 0:
        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_example.values()))
        scale = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
        with torch.no_grad():
            loss_sum = float(loss(model(x), y)) * x.shape[0]
    else:
        per_example, scale, loss_sum = None, None, 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = generator.normal(p.shape, noise_multiplier * clip_norm)
        total = noise.to(p.dtype).to(p.device)
        if per_example is not None:
            g = per_example[name]
            total = total + (g * scale.view(-1, *([1] * (g.dim() - 1)))).sum(0)
        p.grad = total / expected_batch
    return loss_sum


@register("hook", "dpsgd")
class DPSGDHook(TrainHook):
    """DP-SGD as a client hook: Poisson batches, per-example clipping and noise, and the client's own accountant."""

    @dataclass(frozen=True)
    class Config:
        clip: float = field(default=1.0, metadata={"internal": True})
        noise_multiplier: float = field(default=1.0, metadata={"internal": True})
        delta: float = field(default=1e-5, metadata={"internal": True})
        accountant: str = field(default="rdp", metadata={"internal": True})
        target_epsilon: float | None = field(default=None, metadata={"internal": True})  # calibrate z per client
        rounds: int = field(default=1, metadata={"internal": True})  # the rounds the target must last

        def validate(self) -> None:
            positive("clip_norm", self.clip)
            positive("noise_multiplier", self.noise_multiplier)
            if self.target_epsilon is not None:
                positive("target_epsilon", self.target_epsilon)
                positive("rounds", self.rounds)
            if not 0 < self.delta < 1:
                raise ConfigError(f"--delta must be in (0, 1); got {self.delta}")
            from fedlearn.privacy.accountant import ACCOUNTANTS  # dp_accounting only when DP-SGD runs

            if self.accountant not in ACCOUNTANTS:
                raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}; got {self.accountant!r}")

    def attach(self, generator: PrivacyRandom) -> None:
        """The generator for the Poisson sampling and the noise: secret to this client."""
        self.generator = generator

    def weaker_than(self, other: TrainHook) -> bool:
        if not isinstance(other, DPSGDHook):
            return False
        mine, theirs = self.config, other.config
        if theirs.target_epsilon is not None:  # a budget per client: a larger one, or a fixed noise, is weaker
            return (mine.target_epsilon is None or mine.target_epsilon > theirs.target_epsilon
                    or mine.rounds < theirs.rounds or mine.clip > theirs.clip)
        return mine.noise_multiplier < theirs.noise_multiplier or mine.clip > theirs.clip

    def noise_for(self, num_examples: int, batch_size: int, epochs: int) -> float:
        """The noise multiplier this client trains with: the configured one, or calibrated to its data size."""
        c = self.config
        if c.target_epsilon is None:
            return c.noise_multiplier
        return calibrated_noise(c.target_epsilon, num_examples, batch_size, epochs, c.rounds, c.delta, c.accountant)

    def batches(self, ctx: HookContext, dataset: Dataset, batch_size: int):
        self.n = len(dataset)
        self.batch_size = batch_size
        self.z = self.noise_for(self.n, batch_size, ctx.local.local_epochs)
        return poisson_batches(dataset, batch_size, ctx.local.local_epochs, self.generator, ctx.device)

    def backward(self, ctx: HookContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss: Loss) -> torch.Tensor:
        return torch.tensor(private_gradients(
            model, x, y, clip_norm=self.config.clip, noise_multiplier=self.z,
            expected_batch=min(self.batch_size, self.n), generator=self.generator, loss=loss))

    def end(self, ctx: HookContext, params: list[torch.Tensor]) -> None:
        before = ctx.state.get("dpsgd_steps")
        steps = (int(before) if before is not None else 0) + ctx.steps
        ctx.new_state["dpsgd_steps"] = torch.tensor(steps, dtype=torch.int64)  # what its budget counts
