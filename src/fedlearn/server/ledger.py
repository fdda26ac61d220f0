"""The privacy ledger: an append-only, fsynced record of the privacy a run has spent, beside its checkpoints.

A resume can land on an older checkpoint (the newest was damaged, or the server died between a round and its
checkpoint), and the rounds after it run again. Their privacy was spent all the same: an accountant must never
go back. So before a round's results are applied, the strategy's privacy state (central and local DP: the
accountant's rounds and settings; DP-SGD: each client's largest reported epsilon) is appended here as one JSON
line and fsynced, and a resume carries the accountant forward to the ledger's last entry when that is ahead of
the checkpoint. A torn last line (a crash mid-append) is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedlearn.errors import CheckpointError
from fedlearn.server.checkpoint import disk_error, fsync_dir

log = logging.getLogger(__name__)

LEDGER = "privacy_ledger.jsonl"


def privacy_state(strategy: Any) -> dict[str, Any] | None:
    """What ``strategy`` has spent, as plain JSON, or None when it spends no privacy.

    Central and local DP keep a ``PrivacyAccountant`` (``accountant``); DP-SGD keeps the training tasks given to
    each client (``tasks``), from which its epsilon follows.
    """
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and hasattr(accountant, "state_dict"):
        return {"accountant": accountant.state_dict()}
    tasks = getattr(strategy, "tasks", None)
    if isinstance(tasks, dict):
        return {"tasks": {str(k): int(v) for k, v in tasks.items()}}
    return None


def carry_forward(strategy: Any, spent: dict[str, Any]) -> bool:
    """Raise ``strategy``'s privacy state to at least ``spent`` (a ledger entry); True when it moved.

    An accountant whose settings differ from the ledger's is refused (CheckpointError), as a checkpoint's is.
    """
    moved = False
    accountant = getattr(strategy, "accountant", None)
    if "accountant" in spent and accountant is not None:
        ledger_state = spent["accountant"]
        if not isinstance(ledger_state, dict):
            raise CheckpointError("the privacy ledger's accountant entry is damaged; restore privacy_ledger.jsonl")
        steps = ledger_state.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > accountant.steps:
            accountant.load_state_dict(ledger_state)  # checks the settings match this run's
            moved = True
    tasks = getattr(strategy, "tasks", None)
    if isinstance(spent.get("tasks"), dict) and isinstance(tasks, dict):
        for client_id, value in spent["tasks"].items():
            if isinstance(value, int) and not isinstance(value, bool) and value > tasks.get(client_id, 0):
                tasks[str(client_id)] = value
                moved = True
    return moved


class PrivacyLedger:
    """``privacy_ledger.jsonl`` in a run folder: one line ``{"round": r, ...privacy_state}`` per round, fsynced."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def record(self, rnd: int, spent: dict[str, Any]) -> None:
        """Append round ``rnd``'s spend and make it durable before the caller goes on."""
        line = json.dumps({"round": int(rnd), **spent}, allow_nan=False, sort_keys=True) + "\n"
        try:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if new:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise disk_error("record the privacy spent in", self.path, exc) from None

    def latest(self) -> dict[str, Any] | None:
        """The last intact entry, or None when there is none (no file, or nothing readable in it)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read the privacy ledger {self.path} ({type(exc).__name__}); restore it "
                                  "from a backup: resuming without it could under-report the privacy spent") from None
        last = None
        lines = text.splitlines()
        for number, raw in enumerate(lines, 1):
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
                where = "its last line (a save cut short)" if number == len(lines) else f"line {number}"
                log.warning("privacy ledger %s: skipping %s, which is not a ledger entry", self.path, where)
                continue
            last = entry
        return last
