"""`fedlearn server` and `fedlearn client`: the same run, with clients as separate processes over gRPC."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlearn.client.data import ClientData
from fedlearn.client.state import ClientStateStore
from fedlearn.data import DatasetBundle, load_dataset
from fedlearn.errors import ConfigError
from fedlearn.protocol.params import ParamSpec
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_clients, client_app, initial_model, resolve_clients
from fedlearn.run.runner import finish_run, prepare_run
from fedlearn.server.loop import RoundCallback

log = logging.getLogger("fedlearn.server")


@dataclass
class TLSFiles:
    """Certificate files: the server's own pair and optional client CA (mTLS), or a client's CA and pair."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop after saving nothing more than the last completed round."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""
        return 128 + self.signum


def upload_bytes_per_value(config: RunConfig) -> float:
    """The largest upload per model value: float32 updates, 8-byte masked sums above 32 bits, CKKS ciphertexts
    (at most 2 polynomials x L primes x 8 bytes per N/2 values) and the key holder's float64 sum."""
    if config.he == "ckks":
        from fedlearn.privacy import he

        params = he.context_params(he.load_public_context(Path(config.he_keys) / "public.ctx"))
        return max(8.0, 32.0 * len(params.coeff_mod_bit_sizes) + 1)
    if config.secure_aggregation != "none" and config.secagg_bits > 32:
        return 8.0
    return 4.0


def serve(
    config: RunConfig | None,
    address: str,
    *,
    tls: TLSFiles | None = None,
    tokens: str | os.PathLike | None = None,
    allowed_clients: str | None = None,
    allow_any_client: bool = False,
    insecure: bool = False,
    resume: str | os.PathLike | None = None,
    rounds: int | None = None,
    callbacks: Iterable[RoundCallback] = (),
) -> dict[str, Any]:
    """Run the configured rounds with remote clients; returns the run summary.

    Waits for ``config.clients`` clients before the first round; later rounds sample whichever
    clients are alive. The state is checkpointed after every round, so ``resume`` continues a
    server that was killed. Who may be a client: ``fedlearn.security.identity`` (``allowed_clients``
    is ``a,b,c`` or ``@FILE``; without --client-ca or --tokens a loopback server issues per-run tokens).
    """
    import grpc

    from fedlearn.runtime.grpc.limits import StreamLimits
    from fedlearn.runtime.grpc.server import GrpcRuntime, start_server
    from fedlearn.security import (
        AllowList,
        TokenStore,
        install_sighup_reload,
        require_tls,
        server_credentials,
        server_identity,
        split_host_port,
    )

    tls = tls or TLSFiles()
    if config is not None and config.he != "none" and config.he_keys:
        held = [name for name in ("secret.ctx", "group.key") if (Path(config.he_keys) / name).exists()]
        if held:
            raise ConfigError(f"the server's --he-keys folder {config.he_keys} holds {' and '.join(held)}, which only "
                              "clients may hold: give the server a folder with public.ctx alone")
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("give both --cert and --key for TLS, or neither")
    if tls.ca and not tls.cert:
        raise ConfigError("--client-ca (mutual TLS) needs the server's own --cert and --key")
    require_tls(address, tls=tls.cert is not None, insecure=insecure, role="server")
    credentials: grpc.ServerCredentials | None = None
    if tls.cert:
        credentials = server_credentials(tls.cert, tls.key, client_ca=tls.ca, host=address)
    store = TokenStore(tokens) if tokens else None
    allowed = AllowList.parse(allowed_clients) if allowed_clients is not None else None
    identity = server_identity(address, client_ca=tls.ca, tokens=store, allowed=allowed, allow_any=allow_any_client,
                               tls=credentials is not None)
    start = time.perf_counter()
    holder: dict[str, GrpcRuntime] = {}

    def make_runtime(cfg: RunConfig, spec: ParamSpec) -> GrpcRuntime:
        # Only ids the identity admits hold anything here; without a list of them (a token file or an allow-list)
        # the first `clients` ids to join are the run's clients.
        holder["runtime"] = GrpcRuntime(spec, round_timeout=cfg.round_timeout, total_rounds=cfg.rounds,
                                        bytes_per_value=upload_bytes_per_value(cfg), admit=identity.admits,
                                        max_clients=None if (tokens or allowed_clients) else cfg.clients,
                                        max_polls=max(128, 2 * cfg.clients),
                                        streams=StreamLimits(max_streams=max(64, cfg.clients + 16),
                                                             max_seconds=cfg.round_timeout + 60.0),
                                        max_examples_per_client=cfg.max_examples_per_client)
        return holder["runtime"]

    def report(row: dict[str, Any]) -> None:
        runtime = holder["runtime"]
        runtime.completed_rounds = row["round"]
        accuracy = row.get("test_accuracy")
        log.info("round %d/%d: %d/%d clients succeeded%s, accuracy %s, %.1f s", row["round"], runtime.total_rounds,
                 row["clients_succeeded"], row["clients_sampled"],
                 f" (dropped: {', '.join(row['failed_clients'])})" if row["failed_clients"] else "",
                 "-" if accuracy is None else f"{accuracy:.4f}", row["seconds"])

    def wait(rnd: int) -> None:
        runtime = holder["runtime"]
        if not started:  # the first round of this process waits for every client, later ones for enough
            runtime.wait_for_clients(experiment.config.clients)
            started.append(True)
        runtime.wait_for_clients(experiment.config.min_clients)

    started: list[bool] = []
    experiment, run_dir = prepare_run(config, resume=resume, rounds=rounds, callbacks=[report, *callbacks],
                                      runtime=make_runtime, before_round=wait)
    config = experiment.config
    runtime = holder["runtime"]
    runtime.completed_rounds = experiment.loop.round
    runtime.run_id = run_dir.run_id  # the same id after --resume, so clients find their state again
    run_tokens = identity.run_tokens
    if run_tokens is not None:  # published before listening: a client that reaches the port finds its token
        expected = build_clients(config, experiment.bundle)[0]  # the ids `--partition-index i` clients take
        log.info("client tokens for this run in %s", run_tokens.issue(run_dir.path, expected))
    listen_port = split_host_port(address)[1]
    try:
        if run_tokens is not None and listen_port:
            run_tokens.publish(listen_port)
        server, port = start_server(runtime, address, auth=identity.authenticator, credentials=credentials)
        if run_tokens is not None and not listen_port:
            run_tokens.publish(port)
    except BaseException:
        if run_tokens is not None:
            run_tokens.unpublish()
        raise
    security = ("TLS" if credentials else "plaintext") + (", mutual TLS" if tls.ca else "") + (
        ", bearer tokens" if store else "") + f"; {identity.description}"
    log.info("listening on %s (port %d, %s); run directory %s", address, port, security, run_dir.path)
    previous = _install_stop_handlers()
    reloadable = [r for r in (store, allowed) if r is not None and getattr(r, "path", None) is not None]
    if reloadable and threading.current_thread() is threading.main_thread():
        install_sighup_reload(*reloadable)
    finished = False  # clients are told the run is over only when it is; otherwise "stopping, keep waiting"
    try:
        experiment.loop.run(config.rounds)  # the one driver: it asks the strategy before every round
        summary = finish_run(experiment, run_dir, time.perf_counter() - start)
        finished = True
        metric = summary["final_metric"]
        log.info("finished %d rounds: final %s %s; model in %s", summary["rounds"], metric,
                 summary[f"final_{metric}"], run_dir.path)
        return summary
    except Stopped as exc:
        experiment.loop.flush()  # the last completed round's checkpoint is on disk before the process exits
        log.info("stopped by %s after round %d of %d; clients wait for the server; continue with: "
                 "fedlearn server --resume %s", exc, experiment.loop.round, config.rounds, run_dir.path)
        return {"rounds": experiment.loop.round, "stopped": True, "signal": str(exc), "exit_code": exc.exit_code,
                "run_dir": str(run_dir.path)}
    except BaseException as exc:
        log.error("server stopped after round %d by an error (%s); clients wait for the server; once fixed, "
                  "continue with: fedlearn server --resume %s", experiment.loop.round, type(exc).__name__,
                  run_dir.path)
        raise
    finally:
        (runtime.finish if finished else runtime.stop)()
        time.sleep(0.5)  # let long-polling clients hear it
        server.stop(grace=2).wait()
        if run_tokens is not None:
            run_tokens.unpublish()
        _restore_handlers(previous)


def _install_stop_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        _ignore_stop_signals(handlers)  # first, so a second signal cannot interrupt the shutdown
        raise Stopped(signum)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    return handlers


def _ignore_stop_signals(previous: dict[int, Any]) -> None:
    """While stopping, further SIGTERM/SIGINT only say so (``previous``: the handlers to restore later)."""
    def already(signum: int, frame: Any) -> None:
        log.info("already stopping (%s ignored)", signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, already)


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def client_data_for(config: RunConfig, bundle: DatasetBundle, partition_index: int | None,
                    client_id: str | None) -> tuple[str, ClientData]:
    """This process's client id and data: share ``partition_index`` of the run's partition, or the whole dataset."""
    if partition_index is None:
        if not client_id:
            raise ConfigError("give --client-id (or --partition-index to take one share of a partitioned dataset)")
        return client_id, ClientData(bundle.train, bundle.test)
    config = resolve_clients(config, bundle)
    if not 0 <= partition_index < config.clients:
        raise ConfigError(f"--partition-index must be in 0..{config.clients - 1} for --num-partitions "
                          f"{config.clients}; got {partition_index}")
    clients, _ = build_clients(config, bundle)
    default_id, data = list(clients.items())[partition_index]
    return client_id or default_id, data


def run_client(
    config: RunConfig,
    server: str,
    *,
    client_id: str | None = None,
    partition_index: int | None = None,
    tls: TLSFiles | None = None,
    token_file: str | os.PathLike | None = None,
    insecure: bool = False,
    poll_seconds: float = 10.0,
    give_up_after: float | None = 3600.0,
    state_dir: str | os.PathLike | None = None,
    max_backoff: float = 30.0,
) -> int:
    """Join ``server`` as one client and answer its tasks until the run finishes; returns tasks done.

    Without ``token_file``, a client of a loopback server uses the per-run token that server issued
    for its id on this machine, if it issued one (``fedlearn.security.runtokens``).
    """
    import torch

    from fedlearn.runtime.grpc.client import RemoteClient
    from fedlearn.security import channel_credentials, is_loopback, require_tls, wait_for_run_token

    tls = tls or TLSFiles()
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("give both --cert and --key for mutual TLS, or neither")
    if not (math.isfinite(max_backoff) and max_backoff > 0):
        raise ConfigError(f"--max-backoff must be a number of seconds > 0; got {max_backoff}")
    require_tls(server, tls=tls.ca is not None, insecure=insecure, role="client")
    credentials = channel_credentials(tls.ca, tls.cert, tls.key) if tls.ca else None
    token = None
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise ConfigError(f"--token-file {path}: no such file")
        token = path.read_text().strip()
    if tls.ca:
        _probe_until_reachable(server, tls, give_up_after)
    torch.set_num_threads(config.threads)
    bundle = load_dataset(config.dataset, config.data_dir, download=config.download)
    config = resolve_clients(config, bundle).validate()
    if config.seeded_privacy:
        raise ConfigError("seeded_privacy makes privacy noise predictable and is for simulations only; remove it "
                          "from this client's config")
    client_id, data = client_data_for(config, bundle, partition_index, client_id)
    if token is None and is_loopback(server):
        token = wait_for_run_token(server, client_id, give_up_after)
    app = client_app(config, initial_model(config, bundle), {client_id: data}, config.task_name or bundle.task,
                     commit_state=True)
    state_root = Path(state_dir or f"fedlearn-client-state/{_safe(client_id)}")

    def open_state(run_id: str) -> None:
        # This client's own state (SCAFFOLD's control, ...) survives a restart in its own folder, one per run:
        # another run (or a server started afresh) never sees a control variate made for a different model.
        app.state = ClientStateStore.open_latest(state_root / _safe(run_id))
        app.secure.bind_run(run_id)  # HE keys serve one run: a second run with them is refused
        logging.getLogger("fedlearn.client").info("client state in %s (%d entries)", state_root / _safe(run_id),
                                                  len(app.state))

    # The first optimizer a process builds imports torch._dynamo (~2 s here): pay it before joining,
    # not inside round 1's deadline.
    torch.optim.SGD(app.trainer.model.parameters(), lr=0.1)
    examples = (len(data.train), 0 if data.test is None else len(data.test))  # declared at Join: caps its weight
    if config.dp == "dpsgd":  # its count is what DP-SGD protects: it weighs 1, and evaluation is refused under DP
        examples = (1, 0)
    client = RemoteClient(server, client_id, app, credentials=credentials, token=token,
                          poll_seconds=poll_seconds, give_up_after=give_up_after, on_join=open_state,
                          examples=examples, max_backoff=max_backoff)
    logging.getLogger("fedlearn.client").info("client %s joining %s", client_id, server)
    try:
        return client.run()
    finally:
        client.close()


def _safe(client_id: str) -> str:
    """A folder name for a client id (ids may hold characters a file name cannot)."""
    import hashlib

    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)[:40].strip(".") or "client"
    return f"{keep}-{hashlib.sha256(client_id.encode()).hexdigest()[:8]}"


def _probe_until_reachable(server: str, tls: TLSFiles, give_up_after: float | None) -> None:
    """One TLS handshake before anything else: a certificate problem is a one-line error now, not a retry loop."""
    from fedlearn.errors import FedLearnError
    from fedlearn.security import probe_server

    started = time.monotonic()
    delay = 0.5
    while not probe_server(server, tls.ca, tls.cert, tls.key):
        if give_up_after is not None and time.monotonic() - started > give_up_after:
            raise FedLearnError(f"server {server} unreachable for {give_up_after:.0f} s; check the address")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
