"""The default bound on one client's influence: updates are held to a norm the previous honest round set.

A client with valid credentials can send any finite vector (``1e38`` everywhere); a weighted mean
then follows it. Each round has a limit: ``factor`` times the median norm of the previous round's
accepted updates (round 1: ``factor`` times the norm of the global weights); norms are of all of a
result's uplink arrays jointly. An update within the limit is used as sent; one up to
``REFUSE_BEYOND`` times the limit is scaled down to it (norm bounding, Sun et al. 2019: an honest
client with much more data than the others makes larger updates, and keeps its say); anything
larger is refused like any invalid result. Refusing, not scaling, is what the far outliers need:
measured on digits (``benchmarks/influence_bound.py``), scaling one client in ten's huge updates to the
limit still cost 2 points of accuracy at factor 2 and 32 at factor 3, because the attacker pushes one
direction every round; refused, they cost nothing. An attacker that stays near the limit still moves
the model by at most ``factor / K`` median norms a round (K clients): robust aggregators are the
defence beyond that.

It streams: one norm per client is kept, never the updates, and the median of a round's norms does
not depend on the order answers arrive in, so in-process and gRPC runs stay identical. The median
is of bounded norms, so a minority cannot raise the limit. Under secure aggregation or HE no single
norm is visible: there the bound is the client's own clipping (``--clip-norm`` / the
secure-aggregation clip), by design.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.protocol.messages import Arrays
from fedlearn.strategies.base import check_finite

DEFAULT_FACTOR = 5.0
REFUSE_BEYOND = 10.0  # an update over this many limits is refused, not scaled


class InfluenceBound:
    """Holds each update to ``factor`` x the previous round's median update norm: scaled down to it, or refused
    when it is more than ``REFUSE_BEYOND`` times over."""

    def __init__(self, factor: float = DEFAULT_FACTOR) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"update_bound must be a finite number > 0 (or 0 to turn the bound off); got {factor}")
        self.factor = float(factor)
        self.median: float | None = None  # of the previous round's bounded norms
        self._norms: list[float] = []
        self.scaled = 0
        self.refused = 0

    def limit(self, weights: torch.Tensor) -> float:
        """This round's largest allowed norm (infinite only in round 1 with all-zero weights)."""
        if self.median is not None:
            return self.factor * self.median
        reference = float(torch.linalg.vector_norm(weights, dtype=torch.float64))
        return self.factor * reference if reference > 0 else math.inf

    def apply(self, client_id: str, arrays: Arrays, limit: float) -> Arrays:
        """The arrays, scaled down together to ``limit`` if their norm is above it (the bounded norm is recorded);
        InvalidUpdateError when an array holds NaN or Inf or the norm is more than ``REFUSE_BEYOND`` times the
        limit (the plain round's only scan of the values: ``check_result`` leaves NaN/Inf to this norm)."""
        # float32 norms (a third of float64's time); one that overflows is inf, and refused
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(a)) ** 2 for a in arrays.values()))
        if not math.isfinite(norm):
            for name, a in arrays.items():
                check_finite(client_id, name, a)  # NaN or Inf among the values: say so
        if norm > REFUSE_BEYOND * limit or not math.isfinite(norm):
            self.refused += 1
            raise InvalidUpdateError(f"update from {client_id} has norm {norm:.4g}, over {REFUSE_BEYOND:g}x this "
                                     f"round's limit {limit:.4g} ({self.factor:g}x the previous median); refused")
        if norm > limit:
            arrays = {name: a * (limit / norm) for name, a in arrays.items()}
            self.scaled += 1
            norm = limit
        self._norms.append(norm)
        return arrays

    def end_round(self) -> dict[str, int]:
        """Fix next round's limit from this round's bounded norms; returns how many updates it scaled and refused."""
        if self._norms and statistics.median(self._norms) > 0:
            self.median = statistics.median(self._norms)
        counts = {"updates_scaled": self.scaled, "updates_refused": self.refused}
        self.scaled, self.refused, self._norms = 0, 0, []
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "median": self.median}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.median = None if state.get("median") is None else float(state["median"])
