"""Distributed DP: every client adds its share of discrete Gaussian noise inside the secure sum, so what the server
unmasks is already private (Kairouz, Liu and Steinke, ICML 2021). It needs secure aggregation.

The server plans each round's encoding (``privacy.distributed.DiscreteGaussianEncoding``) for the sampled clients:
shares sized so that the fewest honest survivors the round can unmask (its threshold, less the assumed colluding
fraction) still carry noise ``z`` times the integer sensitivity. It divides the unmasked sum by the expected client
count, as DP-FedAvg does, and adds no noise of its own. Each client checks the round against its own policy (clip,
least share noise) before it adds its share.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

from fedlearn.errors import ConfigError
from fedlearn.privacy.distributed import DiscreteGaussianEncoding, DistributedAccountant
from fedlearn.privacy.dp import noise_generator
from fedlearn.protocol.messages import Arrays
from fedlearn.seeding import derive_seed
from fedlearn.strategies.base import Aggregator, PoissonSampler, ServerState, Strategy
from fedlearn.strategies.dp import NoisySum, Wrapper, _check_dp, _set_transform
from fedlearn.transforms.clip import Clip


def honest_shares(clients: int, threshold: int, corrupt: float) -> int:
    """The fewest honest noise shares in any sum the server can unmask: ``threshold`` survivors, of whom up to
    ``corrupt`` of the round's clients collude with the server (their noise is known to it)."""
    return max(1, threshold - math.floor(corrupt * clients))


class DistributedDP(Wrapper):
    """``--dp distributed``: Poisson-sampled clients clip to C and add discrete Gaussian shares inside SecAgg(+)."""

    def __init__(self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, delta: float,
                 population: int, seeded: int | None = None) -> None:
        _check_dp(clip_norm, noise_multiplier)
        if noise_multiplier <= 0:
            raise ConfigError("--dp distributed needs --noise-multiplier > 0 (or --target-epsilon)")
        super().__init__(inner)
        if inner.weighting is None:
            raise ConfigError(f"--dp distributed needs a strategy whose aggregate is a mean; {inner.name} is not")
        self.sampler = inner.sampler = PoissonSampler(inner.sampler.fraction, secret=seeded is None)
        self.weighting = "uniform"
        self.clip_norm, self.noise_multiplier, self.delta = float(clip_norm), float(noise_multiplier), delta
        self.population = population
        self.seeded = seeded  # the simulation-only seeded-privacy switch: rotation seeds from the run seed
        self.accountant = DistributedAccountant(self.sampler.rate, delta)
        self.honest: list[int] = []  # honest shares assumed, per round
        self._generator = noise_generator(None)  # never used for noise: the server adds none
        _set_transform(inner, Clip(Clip.Config(self.clip_norm)))

    def hidden_sum_encoding(self, rnd: int, client_ids: Sequence[str], length: int, *, bits: int, threshold: int,
                            corrupt: float) -> DiscreteGaussianEncoding:
        m = len(client_ids)
        seed = derive_seed(self.seeded, rnd, "rotation") if self.seeded is not None else secrets.randbits(63)
        encoding = DiscreteGaussianEncoding.plan(bits=bits, clip=self.clip_norm, length=length,
                                                 noise_multiplier=self.noise_multiplier, clients=m,
                                                 honest=honest_shares(m, threshold, corrupt), rotation_seed=seed)
        self.accountant.step(encoding.rho(), list(client_ids))  # counted when planned, whatever comes back
        self.honest.append(encoding.honest)
        self._bits = bits
        return encoding

    def aggregator(self, rnd: int, state: ServerState) -> Aggregator:
        self._sum = NoisySum(self.inner.expected_arrays(state), self.clip_norm, 0.0,
                             self.sampler.rate * self.population, self._generator)
        return self._sum

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        return self.inner.apply(state, aggregate, self._sum.expected)  # the expected count, never the realised one

    def round_metrics(self) -> dict[str, Any]:
        return {**self.inner.round_metrics(), "epsilon": self.accountant.epsilon(),
                "epsilon_against_server": self.accountant.epsilon_against_server()}

    def privacy_summary(self) -> dict[str, Any]:
        return {"dp": "distributed", "epsilon": self.accountant.epsilon(), "delta": self.delta,
                "epsilon_against_server": self.accountant.epsilon_against_server(),
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "rounds": self.accountant.steps,
                "honest_noise_shares_assumed": min(self.honest, default=None), "mechanism": "distributed discrete "
                "Gaussian (Kairouz et al. 2021) inside the secure sum", "bits": getattr(self, "_bits", None),
                "epsilon_is": ("per client: 'epsilon' for the released models, amplified by the secret Poisson "
                               "sampling; 'epsilon_against_server' for what the server unmasks, which knows who was "
                               "sampled (no amplification, the most rounds any client was given); both assume at "
                               "least honest_noise_shares_assumed honest shares in every unmasked sum")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(), "honest": list(self.honest)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.honest = [int(h) for h in state.get("honest", [])]
