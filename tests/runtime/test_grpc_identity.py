"""Client identity on a real gRPC server on 127.0.0.1, with raw stubs as the attacker.

- An allow-list of client ids for mutual TLS (the certificate's name) and for tokens (the
  token's owner): a client not on it is refused at Join, and every later RPC re-checks who
  the caller is, so a token of client-1 can neither poll, download nor upload as client-0.
- `fedlearn server` refuses to start when nothing authenticates clients off loopback, unless
  `--allow-any-client` (which warns).
- The one-machine demo: the server issues per-run tokens, `fedlearn client --partition-index i`
  finds its own, and a local process claiming client-0 without that token is refused.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from fedlearn.cli import main
from fedlearn.protocol.codec import FORMAT_VERSION, encode
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.server import GrpcRuntime, start_server
from fedlearn.runtime.grpc.transfer import chunks
from fedlearn.security import (
    AllowList,
    Authenticator,
    TokenStore,
    channel_credentials,
    init_ca,
    issue,
    server_credentials,
)
from processes import free_port, wait_for

SPEC = ParamSpec.from_module(nn.Linear(4, 3))
WAIT = 10.0


# ----- an in-process server and hand-played clients ---------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    init_ca(folder)
    issue(folder, "server", server=True)
    for name in ("client-0", "client-1", "client-2"):
        issue(folder, name, server=False)
    return folder


class Served:
    """A GrpcRuntime behind ``auth`` on 127.0.0.1; ``peer(...)`` dials it as one (possibly lying) client."""

    def __init__(self, auth: Authenticator, credentials: grpc.ServerCredentials | None = None) -> None:
        self.runtime = GrpcRuntime(SPEC, round_timeout=WAIT)
        self.server, self.port = start_server(self.runtime, "127.0.0.1:0", auth=auth, credentials=credentials)
        self.channels: list[grpc.Channel] = []

    def peer(self, claims: str | None, *, token: str | None = None,
             credentials: grpc.ChannelCredentials | None = None) -> Peer:
        channel = (grpc.secure_channel(f"localhost:{self.port}", credentials) if credentials
                   else grpc.insecure_channel(f"127.0.0.1:{self.port}"))
        self.channels.append(channel)
        metadata = [(FORMAT_HEADER, str(FORMAT_VERSION))]
        metadata += [(CLIENT_ID_HEADER, claims)] if claims else []
        metadata += [("authorization", f"Bearer {token}")] if token else []
        return Peer(pb_grpc.FedLearnStub(channel), claims or "", metadata)

    def close(self) -> None:
        self.runtime.finish()
        for channel in self.channels:
            channel.close()
        self.server.stop(0)


class Peer:
    def __init__(self, stub: pb_grpc.FedLearnStub, claims: str, metadata: list[tuple[str, str]]) -> None:
        self.stub, self.claims, self.metadata = stub, claims, metadata

    def join(self, client_id: str | None = None) -> pb.JoinReply:
        return self.stub.Join(pb.JoinRequest(client_id=self.claims if client_id is None else client_id),
                              metadata=self.metadata, timeout=WAIT)

    def poll(self, wait: float = 0.0) -> pb.TaskInfo:
        return self.stub.PollTask(pb.PollRequest(wait_seconds=wait), metadata=self.metadata, timeout=wait + WAIT)

    def download(self, task_id: str) -> bytes:
        stream = self.stub.DownloadTask(pb.DownloadRequest(task_id=task_id), metadata=self.metadata, timeout=WAIT)
        return b"".join(chunk.data for chunk in stream)

    def upload(self, task_id: str, body: bytes) -> pb.UploadReply:
        return self.stub.UploadResult(chunks(body, task_id, 0, None), metadata=self.metadata, timeout=WAIT)

    def status(self, task_id: str) -> pb.UploadReply:
        return self.stub.UploadStatus(pb.UploadStatusRequest(transfer_id=task_id), metadata=self.metadata,
                                      timeout=WAIT)


@pytest.fixture
def serve() -> Iterator:
    started: list[Served] = []

    def make(auth: Authenticator, credentials: grpc.ServerCredentials | None = None) -> Served:
        started.append(Served(auth, credentials))
        return started[-1]

    yield make
    for served in started:
        served.close()


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


def assert_refused(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert "\n" not in error.details()
    for word in words:
        assert word in error.details(), error.details()


def task_for(client_id: str) -> TrainTask:
    return TrainTask(1, client_id, {"weights": torch.zeros(SPEC.numel)}, {"lr": 0.1})


def result_for(client_id: str) -> bytes:
    return encode(TrainResult(1, client_id, 10, {"update": torch.ones(SPEC.numel)}, {}))


class Round:
    """``runtime.deliver`` of one task in a thread, as the round loop runs it."""

    def __init__(self, runtime: GrpcRuntime, client_id: str) -> None:
        self.results: list = []
        self.thread = threading.Thread(target=lambda: self.results.extend(runtime.deliver([task_for(client_id)])),
                                       daemon=True)
        self.thread.start()

    def wait(self) -> list:
        self.thread.join(WAIT + 5)
        assert not self.thread.is_alive()
        return self.results


def impersonation_is_refused_on_every_rpc(served: Served, honest: Peer, impostor: Peer, victim: str) -> None:
    """A round for ``victim``: ``impostor`` can neither see, fetch nor answer it; ``honest`` (the victim) can."""
    rnd = Round(served.runtime, victim)
    info = honest.poll(WAIT)
    assert info.has_task
    for call in (impostor.join, impostor.poll, lambda: impostor.download(info.task_id),
                 lambda: impostor.status(info.task_id), lambda: impostor.upload(info.task_id, result_for(victim))):
        assert_refused(refused(call), grpc.StatusCode.PERMISSION_DENIED)
    honest.download(info.task_id)
    assert honest.upload(info.task_id, result_for(victim)).complete
    (result,) = rnd.wait()
    assert isinstance(result, TrainResult) and result.client_id == victim


def test_mtls_allow_list_refuses_unlisted_certificates_at_join_and_mismatched_claims_everywhere(serve, certs):
    credentials = server_credentials(certs / "server.pem", certs / "server.key", client_ca=certs / "ca.pem",
                                     host="localhost")
    auth = Authenticator(mtls=True, allowed_clients=AllowList.parse("client-0,client-1"))
    served = serve(auth, credentials)

    def cert(name: str) -> grpc.ChannelCredentials:
        return channel_credentials(certs / "ca.pem", certs / f"{name}.pem", certs / f"{name}.key")

    stranger = served.peer("client-2", credentials=cert("client-2"))  # signed by the same CA, not on the list
    assert_refused(refused(stranger.join), grpc.StatusCode.PERMISSION_DENIED, "'client-2' is not registered",
                   "--allowed-clients")
    assert_refused(refused(stranger.poll), grpc.StatusCode.PERMISSION_DENIED)
    assert served.runtime.client_ids() == []

    honest = served.peer("client-0", credentials=cert("client-0"))
    honest.join()
    liar = served.peer("client-0", credentials=cert("client-1"))  # client-1's certificate claiming client-0
    assert_refused(refused(liar.join), grpc.StatusCode.PERMISSION_DENIED, "claims client 'client-0'",
                   "certificate belongs to 'client-1'")
    impersonation_is_refused_on_every_rpc(served, honest, liar, "client-0")
    # Honest about being client-1, it still cannot touch client-0's task.
    other = served.peer("client-1", credentials=cert("client-1"))
    other.join()
    rnd = Round(served.runtime, "client-0")
    info = honest.poll(WAIT)
    assert not other.poll().has_task
    assert_refused(refused(other.download, info.task_id), grpc.StatusCode.PERMISSION_DENIED)
    assert_refused(refused(other.upload, info.task_id, result_for("client-0")), grpc.StatusCode.PERMISSION_DENIED)
    honest.upload(info.task_id, result_for("client-0"))
    assert rnd.wait()[0].client_id == "client-0"
    assert served.runtime.client_ids() == ["client-0", "client-1"]


def test_tokens_are_bound_to_one_client_and_the_allow_list_is_rechecked_on_every_rpc(serve, tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    tokens = {name: store.add(name) for name in ("client-0", "client-1", "client-2")}
    listed = tmp_path / "clients.txt"
    listed.write_text("client-0\nclient-1\n")
    allowed = AllowList.parse(f"@{listed}")
    served = serve(Authenticator(tokens=store, allowed_clients=allowed))

    unlisted = served.peer("client-2", token=tokens["client-2"])  # a valid token, not on the list
    assert_refused(refused(unlisted.join), grpc.StatusCode.PERMISSION_DENIED, "'client-2' is not registered")
    assert_refused(refused(served.peer("client-0").join), grpc.StatusCode.UNAUTHENTICATED, "token")
    assert served.runtime.client_ids() == []

    honest = served.peer("client-0", token=tokens["client-0"])
    honest.join()
    liar = served.peer("client-0", token=tokens["client-1"])
    impersonation_is_refused_on_every_rpc(served, honest, liar, "client-0")
    silent = served.peer(None, token=tokens["client-1"])  # claims nothing: it is client-1, and only that
    silent.join()
    assert served.runtime.client_ids() == ["client-0", "client-1"]

    # The operator removes client-1 and reloads: its very next call is refused, the others go on.
    listed.write_text("client-0\n")
    assert allowed.reload()
    assert_refused(refused(silent.poll), grpc.StatusCode.PERMISSION_DENIED, "'client-1' is not registered")
    assert not honest.poll().has_task


# ----- `fedlearn server` / `fedlearn client` processes --------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_peer(port: int, claims: str, token: str | None = None) -> tuple[grpc.Channel, Peer]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    metadata = [(FORMAT_HEADER, str(FORMAT_VERSION)), (CLIENT_ID_HEADER, claims)]
    metadata += [("authorization", f"Bearer {token}")] if token else []
    return channel, Peer(pb_grpc.FedLearnStub(channel), claims, metadata)


def test_loopback_demo_gets_per_run_tokens_and_refuses_a_local_impostor(tmp_path, procs):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("clients: 2\nrounds: 1\nround_timeout: 60\nmodel: mcmahan-2nn\nlocal_epochs: 1\n")
    home, elsewhere, run = tmp_path / "home", tmp_path / "another-user", tmp_path / "run"
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The README's one-machine demo, unchanged: no token flags anywhere. Started with the server: client-1 (it
    # waits for the server, then for client-0) and, run by someone who cannot read this user's ~/.fedlearn
    # (here: another FEDLEARN_HOME), a second `fedlearn client` claiming client-0.
    server = procs.start("server", "server", "--config", str(cfg), "--address", address, "--output", str(run),
                         env={"FEDLEARN_HOME": str(home)})
    client_args = ["client", "--server", address, "--config", str(cfg), "--give-up-after", "60"]
    impostor = procs.start("impostor", *client_args, "--partition-index", "0", env={"FEDLEARN_HOME": str(elsewhere)})
    honest = [procs.start("client1", *client_args, "--partition-index", "1", env={"FEDLEARN_HOME": str(home)})]
    pointer = home / "loopback" / f"{port}.json"
    wait_for(lambda: pointer.exists() or server.poll() is not None, 120, "the server to publish its tokens")
    assert server.poll() is None, procs.log("server")
    folder = run / "client-tokens"
    assert json.loads(pointer.read_text())["tokens"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["client-0.token", "client-1.token"]
    if os.name == "posix":
        assert (mode(home / "loopback"), mode(pointer), mode(folder)) == (0o700, 0o600, 0o700)
        assert {mode(p) for p in folder.iterdir()} == {0o600}

    # Another local process, as a raw stub: claiming client-0 without its token, with a made-up one,
    # or with client-1's token, it is refused.
    wait_for(lambda: "listening on" in procs.log("server"), 60, "the server to listen")
    channel, no_token = raw_peer(port, "client-0")
    try:
        assert_refused(refused(no_token.join), grpc.StatusCode.UNAUTHENTICATED, "per-run tokens")
        assert_refused(refused(no_token.poll), grpc.StatusCode.UNAUTHENTICATED)
        _, guessed = raw_peer(port, "client-0", "x" * 43)
        assert_refused(refused(guessed.join), grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked")
        token1 = (folder / "client-1.token").read_text().strip()
        _, borrowed = raw_peer(port, "client-0", token1)
        assert_refused(refused(borrowed.join), grpc.StatusCode.PERMISSION_DENIED, "belongs to 'client-1'")
    finally:
        channel.close()
    honest.insert(0, procs.start("client0", *client_args, "--partition-index", "0", env={"FEDLEARN_HOME": str(home)}))
    assert impostor.wait(timeout=120) == 2, procs.log("impostor")
    errors = [ln for ln in procs.log("impostor").splitlines() if ln.startswith("fedlearn: error:")]
    assert len(errors) == 1 and "requires a client token" in errors[0], procs.log("impostor")
    assert server.wait(timeout=180) == 0, procs.log("server")
    assert all(c.wait(timeout=60) == 0 for c in honest), procs.log("client0")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["clients_succeeded"] for r in history] == [2]
    assert "per-run client tokens" in procs.log("server")
    assert "using this machine's per-run token for client-0" in procs.log("client0")
    assert not pointer.exists()  # the pointer goes with the server; the tokens stay with the run (--resume)
    assert (folder / "client-0.token").exists()


@pytest.mark.parametrize("extra, words", [
    (["--insecure"], "nothing authenticates clients on 0.0.0.0"),
    (["--cert", "{certs}/server.pem", "--key", "{certs}/server.key"], "TLS protects the connection"),
])
def test_server_without_client_authentication_off_loopback_refuses_to_start(tmp_path, certs, capsys, extra, words):
    run = tmp_path / "run"
    args = [a.format(certs=certs) for a in extra]
    code: list[int] = []  # in a thread, so a server that does start fails the test instead of hanging it
    thread = threading.Thread(target=lambda: code.append(
        main(["server", "--address", "0.0.0.0:0", "--output", str(run), *args])), daemon=True)
    thread.start()
    thread.join(60)
    assert code == [2], "the server started without anything authenticating its clients"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlearn: error:") and words in err[0], err
    assert "--allow-any-client" in err[0]
    assert not run.exists()  # refused before the run directory exists


def test_allow_any_client_warns_loudly_and_accepts_a_claimed_id(tmp_path, procs):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("clients: 2\nrounds: 1\nmodel: mcmahan-2nn\n")
    home, port = tmp_path / "home", free_port()
    server = procs.start("server", "server", "--config", str(cfg), "--address", f"127.0.0.1:{port}", "--output",
                         str(tmp_path / "run"), "--allow-any-client", env={"FEDLEARN_HOME": str(home)})
    wait_for(lambda: "listening on" in procs.log("server") or server.poll() is not None, 120, "the server")
    assert server.poll() is None, procs.log("server")
    assert "NO CLIENT AUTHENTICATION (--allow-any-client)" in procs.log("server")
    assert not (home / "loopback" / f"{port}.json").exists() and not (tmp_path / "run" / "client-tokens").exists()
    channel, anyone = raw_peer(port, "client-0")
    try:
        assert anyone.join().run_id  # nothing proves who it is, as the operator asked
    finally:
        channel.close()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
