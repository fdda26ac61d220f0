"""The privacy ledger: appended and fsynced per round, read back past a torn line, never lets an accountant go back."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from fedlearn.errors import CheckpointError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.server import ledger as ledger_module
from fedlearn.server.ledger import PrivacyLedger, carry_forward, privacy_state
from fedlearn.strategies.dp import DPSGD, CentralDP
from fedlearn.strategies.fedavg import FedAvg


def central(noise: float = 1.0) -> CentralDP:
    return CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=noise, delta=1e-5, noise_seed=0)


def test_record_and_latest_round_trip(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path / "run" / "privacy_ledger.jsonl")
    assert ledger.latest() is None
    strategy = central()
    for rnd in (1, 2, 3):
        strategy.accountant.step()
        ledger.record(rnd, privacy_state(strategy))
    latest = ledger.latest()
    assert latest["round"] == 3 and latest["accountant"] == strategy.accountant.state_dict()
    assert len(ledger.path.read_text().splitlines()) == 3


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    strategy = central()
    strategy.accountant.step()
    ledger.record(1, privacy_state(strategy))
    with open(ledger.path, "a") as f:
        f.write('{"round": 2, "accountant": {"ste')  # the process died mid-append
    with caplog.at_level(logging.WARNING, logger="fedlearn.server.ledger"):
        assert ledger.latest()["round"] == 1
    assert "last line" in caplog.text


def test_carry_forward_raises_but_never_lowers_the_accountant() -> None:
    spent = central()
    spent.accountant.step(5)
    entry = privacy_state(spent)
    behind = central()
    behind.accountant.step(2)
    assert carry_forward(behind, entry) and behind.accountant.steps == 5
    ahead = central()
    ahead.accountant.step(7)
    assert not carry_forward(ahead, entry) and ahead.accountant.steps == 7
    reference = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=behind.sampler.rate, delta=1e-5)
    assert behind.accountant.epsilon() == pytest.approx(reference.epsilon_after(5), rel=1e-12)


def test_a_ledger_from_other_privacy_settings_is_refused() -> None:
    spent = central(noise=1.0)
    spent.accountant.step(3)
    with pytest.raises(CheckpointError, match="noise"):
        carry_forward(central(noise=2.0), privacy_state(spent))


def test_dpsgd_keeps_each_clients_most_tasks() -> None:
    strategy = DPSGD(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, counts={"a": (10, 5)})
    strategy.tasks.update({"a": 1, "b": 3})
    assert privacy_state(strategy) == {"tasks": {"a": 1, "b": 3}}
    assert carry_forward(strategy, {"round": 4, "tasks": {"a": 2, "b": 1, "c": 4, "d": 2.5, "e": True}})
    assert strategy.tasks == {"a": 2, "b": 3, "c": 4}  # never fewer; a non-integer count is not one
    assert privacy_state(FedAvg()) is None


def test_a_failed_append_is_one_line(tmp_path, monkeypatch) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ledger_module.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"ENOSPC.*free disk space.*--resume") as error:
        ledger.record(1, {"accountant": {"steps": 1}})
    assert "\n" not in str(error.value)
