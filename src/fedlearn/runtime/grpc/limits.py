"""Bounds on what callers may hold open on a server, so no caller can starve the others of its threads.

Each open transfer stream (an upload or a download) holds one worker thread. ``StreamWatch``
admits a stream only within a total and a per-client count (RESOURCE_EXHAUSTED beyond them: the
client backs off and retries), and one watchdog thread cancels any stream that made no progress
for ``idle_seconds`` or has been open ``max_seconds``, so idle or trickling streams cannot pin
threads. Long polls are bounded by the runtime itself (one per client, a total, a capped wait).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fedlearn.runtime.grpc.auth import AuthError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """How many transfer streams may be open (in total and per client) and for how long."""

    max_streams: int = 64
    per_client: int = 2  # a client's one download and one upload (its own client never runs more)
    idle_seconds: float = 60.0  # no chunk received or sent for this long: the stream is cut
    max_seconds: float = 900.0  # open this long: cut (a result this late misses its round anyway)


@dataclass(eq=False)
class OpenStream:
    """One admitted stream: ``progress()`` after every chunk; the watchdog calls ``cancel`` to cut it."""

    client_id: str
    kind: str
    cancel: Callable[[], object]
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    cut: str = ""  # why the watchdog cut it ("" while it may run)

    def progress(self) -> None:
        self.last_progress = time.monotonic()


class StreamWatch:
    """Admits transfer streams within ``StreamLimits`` and cuts those idle or open too long."""

    def __init__(self, limits: StreamLimits, tick: float | None = None) -> None:
        self.limits = limits
        self.tick = tick if tick is not None else max(0.05, min(1.0, limits.idle_seconds / 4))
        self._lock = threading.Lock()
        self._open: set[OpenStream] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, client_id: str, kind: str, cancel: Callable[[], object]) -> OpenStream:
        """Admit a stream or raise AuthError(RESOURCE_EXHAUSTED) naming the limit reached."""
        with self._lock:
            mine = sum(1 for s in self._open if s.client_id == client_id)
            if mine >= self.limits.per_client:
                raise AuthError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"client {client_id!r} already has {mine} transfers open (at most "
                                f"{self.limits.per_client}); finish or cancel one, then retry")
            if len(self._open) >= self.limits.max_streams:
                raise AuthError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server has {len(self._open)} transfers open, its limit; retry with backoff")
            stream = OpenStream(client_id, kind, cancel)
            self._open.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="fedlearn-stream-watch", daemon=True)
                self._thread.start()
            return stream

    def close(self, stream: OpenStream) -> None:
        """Release a stream's slot (idempotent)."""
        with self._lock:
            self._open.discard(stream)

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def shutdown(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                expired = [s for s in self._open if not s.cut and (
                    now - s.last_progress > self.limits.idle_seconds or now - s.started > self.limits.max_seconds)]
                for s in expired:
                    s.cut = (f"no data for {self.limits.idle_seconds:g} s"
                             if now - s.last_progress > self.limits.idle_seconds
                             else f"open longer than {self.limits.max_seconds:g} s")
                    self._open.discard(s)
            for s in expired:
                log.warning("%s stream of %s cut: %s", s.kind, s.client_id, s.cut)
                s.cancel()
