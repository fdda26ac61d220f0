"""Real fedlearn processes for tests: start them on 127.0.0.1 with their output in log files, kill them by pid.

One copy for every test module that runs servers and clients (on the test path via pytest's ``pythonpath``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

FEDLEARN = [sys.executable, "-m", "fedlearn.cli"]


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, **values) -> Path:
    """A YAML run config of ``values`` (flat keys only) at ``path``."""
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` every 0.1 s; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Procs:
    """Starts fedlearn processes in ``folder`` (where clients keep their state), each with its output in
    ``<name>.log``, and kills whatever is left, by pid, in ``stop_all``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_name: dict[str, subprocess.Popen] = {}  # the latest process of each name
        self.started: list[subprocess.Popen] = []  # every process, for stop_all

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """``fedlearn ARGS`` as process ``name`` (``env`` is added to this process's environment). A client backs
        off at most 2 s between reconnects (not 30), so a restarted server is rejoined in test time."""
        if args and args[0] == "client" and "--max-backoff" not in args:
            args = (*args, "--max-backoff", "2")
        with open(self.folder / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([*FEDLEARN, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                    env={**os.environ, **env} if env else None)
        proc.name = name
        self.by_name[name] = proc
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, name: str, timeout: float) -> int | None:
        """The process's exit code, or None if it is still running after ``timeout`` seconds."""
        try:
            return self.by_name[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
