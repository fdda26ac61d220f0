"""What a run writes for others to read under DP: only what epsilon covers, or what depends on no client's data.

The model and the noised aggregate are covered. The statistics below are exact functions of clients' data that no
noise touches, so a DP run does not publish them (the operator's own log still shows its server's view):
- central and distributed DP: the mean train loss, and who and how many took part, with what counts it (bytes
  moved, a round's seconds): add/remove-one adjacency makes the realised count sensitive, and DP-FedAvg divides by
  the expected count to hide it;
- local DP and DP-SGD: the mean train loss;
- every DP mode: the per-client label histograms of a simulation's partition.
"""

from __future__ import annotations

from typing import Any

from fedlearn.run.config import RunConfig

# Who and how many took part, and what gives it away: each upload is one model's size, and a round's time grows
# with its cohort.
PARTICIPATION = ("clients_sampled", "clients_succeeded", "failed_clients", "fed_failed_clients", "updates_scaled",
                 "updates_refused", "bytes_up", "bytes_down", "seconds")
SUMMARY_PARTICIPATION = ("bytes_up", "bytes_down", "round_seconds")
WITHHELD = {"central": ("train_loss", *PARTICIPATION), "distributed": ("train_loss", *PARTICIPATION),
            "local": ("train_loss",), "dpsgd": ("train_loss",)}
LABEL_HISTOGRAMS = ("label_counts", "test_label_counts")


def withheld(config: RunConfig) -> tuple[str, ...]:
    """The row keys a run under ``config.dp`` does not publish."""
    return WITHHELD.get(config.dp, ())


def public_row(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``row`` without the withheld ``keys``."""
    return {k: v for k, v in row.items() if k not in keys} if keys else row


def public_partition(partition: list[dict[str, Any]], config: RunConfig) -> list[dict[str, Any]]:
    """The simulation's partition as partition.json shows it: without label histograms under DP."""
    if config.dp == "none":
        return partition
    return [{k: v for k, v in client.items() if k not in LABEL_HISTOGRAMS} for client in partition]


def public_summary(summary: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """summary.json as published: under DP it says what epsilon covers and what is not published; under central
    DP it also drops the totals that count participation (bytes, round seconds)."""
    if config.dp == "none":
        return summary
    dropped = SUMMARY_PARTICIPATION if config.dp in ("central", "distributed") else ()
    out = {k: v for k, v in summary.items() if k not in dropped}
    out["epsilon_covers"] = "the model and every published metric; unnoised statistics are not published"
    out["not_published"] = [*withheld(config), *dropped, "partition label histograms"]
    return out
