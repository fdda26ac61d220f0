"""A participant with valid credentials attacks a real run: each hostile message is refused and the run is unharmed.

One attacked run serves the module: `fedlearn server --tokens` on 127.0.0.1 with three honest
`fedlearn client` processes, plus client-3, whose token is valid and whose tasks a raw gRPC stub in
this process answers, round by round, with each hostile message of issue 11 that can reach a server:
counts of 10**12, 10**400 and strings; a finite 1e38 update, a float64 payload, NaN, Inf and the wrong
length; evaluation answers with inflated counts, accuracy 0.99999992 or NaN; malformed bodies (bad
magic, deeply nested JSON, negative size, empty chunks); answers for another client, another round
or twice; calls as another id with its own token. Each attack is one test
(``test_attack_is_refused[<attack>]``), so a failure names the attack class, and passes when:

- the transport refuses it with a specific gRPC status and a one-line message (never UNKNOWN/INTERNAL);
- or the transport takes the body and the round loop refuses it: the server logs "round N: rejected
  <what>: <reason>" and a refused train result puts the attacker in that round's ``failed_clients``;
- or, for an evaluation claim nobody can disprove (a client's test set is its own), it counts with the
  attacker's declared test examples at most.

For the run as a whole: the server answers Join and health checks after every attack and exits 0, the
honest clients finish every round, summary.json and metrics.jsonl hold no NaN, every round's federated
accuracy is exactly the honest clients' own (recomputed here by the clients' code), and the final
accuracy is within 2 points of the same configuration un-attacked (`fedlearn run`, four honest clients:
an in-process run and its gRPC deployment are identical, tests/run/test_deploy.py). The partition is
IID, so losing the attacker's quarter of the data costs about a point and the comparison measures the
attack.

A second, smaller run holds the attacks that once crashed the server (a crash would end the shared
run): metrics too large to add (a train loss of 1e308, an integer metric of 10**400), and a documented
limit pinned as it is: a client that declares the ceiling at Join weighs that much.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlearn.cli import main
from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode
from fedlearn.protocol.messages import EvalResult, TrainResult
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.transfer import chunks, digest
from processes import Procs, free_port, write_config

pytestmark = pytest.mark.slow

HONEST = ("client-0", "client-1", "client-2")
ATTACKER = "client-3"
ROUNDS = 9
DECLARED = (280, 70)  # the (train, test) examples the attacker declares at Join: about a quarter's share
CONFIG = dict(dataset="digits", model="mcmahan-2nn", partition="iid", clients=4, rounds=ROUNDS, local_epochs=1,
              fraction=1.0, min_clients=2, evaluation="both", round_timeout=25, seed=0)
WAIT = 10.0  # seconds for one RPC
RUN_LIMIT = 150.0  # seconds the attacker keeps playing before it gives up on the run
SERVICE = "fedlearn.v1.FedLearn"


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not numbers there."""
    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def issue_token(tokens: Path, client_id: str) -> str:
    """`fedlearn tokens add CLIENT --file tokens.txt`: the token it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["tokens", "add", client_id, "--file", str(tokens)]) == 0
    return out.getvalue().strip()


# ----- the attacker: a raw stub with client-3's valid token -------------------------------------------------


@dataclass
class Outcome:
    """What one attack got back, and whether the server was still serving right after it."""

    round: int
    code: str  # a grpc.StatusCode name, or "OK" (with ``complete``) when the call went through
    details: str
    serving: bool
    complete: bool = False


@dataclass
class Ctx:
    """The task being attacked: its TaskInfo, decoded task and the model's size."""

    info: pb.TaskInfo
    task: object
    numel: int


Action = Callable[["Attacker", Ctx], object]


class Attacker:
    """Client ``client_id`` (with its own valid token) played by hand: ``plans[(round, kind)]`` is the list of
    (attack name, action) tried on that task, an action returning the call's reply or raising grpc.RpcError;
    ``fallback`` answers tasks no plan covers (refused too)."""

    def __init__(self, target: str, client_id: str, token: str, server: subprocess.Popen,
                 plans: dict[tuple[int, str], list], fallback: dict[str, Action], declared: tuple[int, int]) -> None:
        self.client_id = client_id
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.FedLearnStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.token, self.server, self.plans, self.fallback, self.declared = token, server, plans, fallback, declared
        self.outcomes: dict[str, Outcome] = {}
        self.task_ids: dict[tuple[int, str], str] = {}
        self.bodies: dict[tuple[int, str], bytes] = {}  # the last body sent per task, for replays
        self.seen: list[tuple[int, str]] = []
        self.evaluated: dict[int, object] = {}  # round -> the EvalTask it was sent: the weights the round scored
        self.end = ""  # how the attacker's run ended: "finished", "stopping", "gone", "timeout" or an error
        self.thread = threading.Thread(target=self._run, name="attacker", daemon=True)

    # ----- calls --------------------------------------------------------------------------------------
    def md(self, claims: str | None = "own", token: str | None = "own", fmt: str = str(FORMAT_VERSION)):
        claims = self.client_id if claims == "own" else claims
        token = self.token if token == "own" else token
        out = [(FORMAT_HEADER, fmt)]
        out += [(CLIENT_ID_HEADER, claims)] if claims else []
        out += [("authorization", f"Bearer {token}")] if token else []
        return out

    def join(self, request: pb.JoinRequest | None = None, md=None) -> pb.JoinReply:
        if request is None:
            request = pb.JoinRequest(client_id=self.client_id, train_examples=self.declared[0],
                                     test_examples=self.declared[1])
        return self.stub.Join(request, metadata=md or self.md(), timeout=WAIT)

    def poll(self, wait: float = 5.0, md=None) -> pb.TaskInfo:
        return self.stub.PollTask(pb.PollRequest(wait_seconds=wait), metadata=md or self.md(),
                                  timeout=(wait if math.isfinite(wait) and wait > 0 else 0) + WAIT)

    def download(self, task_id: str, md=None) -> bytes:
        stream = self.stub.DownloadTask(pb.DownloadRequest(task_id=task_id), metadata=md or self.md(), timeout=WAIT)
        return b"".join(chunk.data for chunk in stream)

    def upload(self, task_id: str, body: bytes, md=None, checksum: bytes | None = None) -> pb.UploadReply:
        return self.stream(chunks(body, task_id, 0, checksum), md)

    def stream(self, request: Iterator[pb.Chunk], md=None) -> pb.UploadReply:
        return self.stub.UploadResult(request, metadata=md or self.md(), timeout=WAIT)

    def answer(self, ctx: Ctx, body: bytes) -> pb.UploadReply:
        """Upload ``body`` to the task being attacked, remembering it for replays."""
        self.bodies[(ctx.info.round, ctx.info.kind)] = body
        return self.upload(ctx.info.task_id, body)

    def serving(self) -> bool:
        """The server process is alive, says SERVING and admits this client's Join."""
        if self.server.poll() is not None:
            return False
        try:
            check = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT)
            self.join()
        except grpc.RpcError:
            return False
        return check.status == health_pb2.HealthCheckResponse.SERVING

    # ----- the game -----------------------------------------------------------------------------------
    def attempt(self, name: str, ctx: Ctx, action: Action) -> None:
        try:
            reply = action(self, ctx)
            outcome = Outcome(ctx.info.round, "OK", str(reply).strip(), False,
                              bool(getattr(reply, "complete", False)))
        except grpc.RpcError as exc:
            outcome = Outcome(ctx.info.round, exc.code().name, exc.details() or "", False)
        outcome.serving = self.serving()
        if name:
            self.outcomes[name] = outcome

    def _run(self) -> None:
        deadline = time.monotonic() + RUN_LIMIT
        try:
            self.join()
            for _ in range(2000):  # each pass is one poll of at most 5 s, or one task
                if time.monotonic() > deadline:
                    self.end = "timeout"
                    return
                try:
                    info = self.poll()
                except grpc.RpcError as exc:
                    if self.server.poll() is not None:
                        self.end = "gone"
                        return
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self.join()
                    time.sleep(0.2)
                    continue
                if info.state == pb.RUN_STATE_FINISHED:
                    self.end = "finished"
                    return
                if info.state == pb.RUN_STATE_STOPPING:
                    self.end = "stopping"
                    return
                if info.has_task:
                    self._play(info)
            self.end = "too many polls"
        except BaseException as exc:  # reported by the fixture: the attacker itself must not hide a failure
            self.end = f"attacker failed: {type(exc).__name__}: {exc}"

    def _play(self, info: pb.TaskInfo) -> None:
        key = (info.round, info.kind)
        self.seen.append(key)
        self.task_ids[key] = info.task_id
        task = decode(self.download(info.task_id))
        if info.kind == "evaluate":
            self.evaluated[info.round] = task
        ctx = Ctx(info, task, task.arrays["weights"].numel())
        for name, action in self.plans.get(key, [("", self.fallback[info.kind])]):
            self.attempt(name, ctx, action)


# ----- hostile bodies ---------------------------------------------------------------------------------------


def train_body(ctx: Ctx, *, count=DECLARED[0], update: torch.Tensor | None = None, client_id: str | None = None,
               arrays: dict | None = None, metrics: dict | None = None) -> bytes:
    """A train result for the task being attacked (a zero update by default: the attacker trains nothing)."""
    update = torch.zeros(ctx.numel) if update is None else update
    return encode(TrainResult(ctx.info.round, client_id or ctx.task.client_id, count,
                              arrays if arrays is not None else {"update": update},
                              {"train_loss": 0.5} if metrics is None else metrics))


def eval_body(ctx: Ctx, *, count=DECLARED[1], metrics: dict | None = None) -> bytes:
    metrics = {"loss": 0.3, "accuracy": 0.9} if metrics is None else metrics
    return encode(EvalResult(ctx.info.round, ctx.task.client_id, count, metrics))


def sums(n: int, correct: float, loss: float = 0.0) -> dict[str, float]:
    """Classification sums as an honest client sends them (``sum.classification.*``) for ``n`` examples."""
    return {"sum.classification.n": float(n), "sum.classification.correct": float(correct),
            "sum.classification.loss_sum": float(loss)}


def nested_json() -> bytes:
    header = b'{"version":2,"type":"TrainResult","fields":{"metrics":' + b'{"a":' * 5000 + b"1" + b"}" * 5002
    return b"FLM\x02" + len(header).to_bytes(4, "little") + header


def empty_chunks(ctx: Ctx) -> Iterator[pb.Chunk]:
    body = train_body(ctx)
    for _ in range(10_000):
        yield pb.Chunk(transfer_id=ctx.info.task_id, offset=0, data=b"", total_size=len(body), sha256=digest(body))


def one_chunk(ctx: Ctx, **fields) -> Iterator[pb.Chunk]:
    body = train_body(ctx)
    values = dict(transfer_id=ctx.info.task_id, offset=0, data=body[:100], total_size=len(body),
                  sha256=digest(body)) | fields
    yield pb.Chunk(**values)


def forged_task_id(ctx: Ctx, victim: str = "client-0") -> str:
    return f"{ctx.info.round}-{ctx.info.kind}-{victim}-{'0' * 12}"  # the shape of a real id; the suffix is random


# ----- the attacks: what each sends, and what the server must answer -------------------------------------


@dataclass(frozen=True)
class Refusal:
    """The transport refuses it: this status, and these words in a one-line message."""

    code: str
    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejection:
    """The transport takes it; the round loop refuses it: "round N: rejected <what>: ...<words>..." in the server
    log, and (for a train task) the attacker in that round's failed_clients."""

    what: str  # "train task" or "evaluation"
    words: str


@dataclass(frozen=True)
class Weighed:
    """An evaluation claim nobody can disprove (a client's test set is its own): it may count, but at most with
    the attacker's declared test examples, ``correct`` of them right (None: it must carry no weight at all)."""

    correct: int | None


@dataclass(frozen=True)
class Attack:
    expect: Refusal | Rejection | Weighed
    action: Action


def R(code: str, *words: str) -> Refusal:  # noqa: N802 - reads as a table
    return Refusal(code, words)


FORGED_BINARY = {"loss": 0.3, "tp": 30.0, "fp": 5.0, "tn": 30.0, "fn": 5.0, "pos_bin_200": 35.0, "neg_bin_100": 35.0}

ATTACKS: dict[str, Attack] = {
    # ----- round 1, train task: the transport's refusals (the task stays open for the next try) -----
    "count as a string": Attack(R("INVALID_ARGUMENT", "num_examples", "must be int"),
                                lambda a, c: a.answer(c, train_body(c, count="1000"))),
    "count 10**400 as a string": Attack(R("INVALID_ARGUMENT", "num_examples", "must be int"),
                                        lambda a, c: a.answer(c, train_body(c, count=str(10**400)))),
    "count as a bool": Attack(R("INVALID_ARGUMENT", "num_examples"),
                              lambda a, c: a.answer(c, train_body(c, count=True))),
    "update of the wrong length": Attack(R("INVALID_ARGUMENT", "values"),
                                         lambda a, c: a.answer(c, train_body(c, update=torch.zeros(c.numel - 1)))),
    "an array the task did not ask for": Attack(
        R("INVALID_ARGUMENT", "declared"),
        lambda a, c: a.answer(c, train_body(c, arrays={"update": torch.zeros(c.numel),
                                                       "control_delta": torch.zeros(c.numel)}))),
    "bad magic": Attack(R("INVALID_ARGUMENT", "malformed"),
                        lambda a, c: a.upload(c.info.task_id, b"BAD" + train_body(c)[3:])),
    "deeply nested JSON header": Attack(R("INVALID_ARGUMENT", "malformed"),
                                        lambda a, c: a.upload(c.info.task_id, nested_json())),
    "negative upload size": Attack(R("INVALID_ARGUMENT", "-5 bytes"),
                                   lambda a, c: a.stream(one_chunk(c, total_size=-5))),
    "empty chunks": Attack(R("INVALID_ARGUMENT", "empty upload chunk"), lambda a, c: a.stream(empty_chunks(c))),
    "upload larger than the task allows": Attack(R("INVALID_ARGUMENT", "larger than"),
                                                 lambda a, c: a.stream(one_chunk(c, total_size=10**12))),
    "body that fails its checksum": Attack(R("DATA_LOSS", "SHA-256"),
                                           lambda a, c: a.upload(c.info.task_id, train_body(c),
                                                                 checksum=digest(b"another body"))),
    "chunk out of order": Attack(R("FAILED_PRECONDITION", "resume"), lambda a, c: a.stream(one_chunk(c, offset=7))),
    "an evaluation answer to a train task": Attack(R("INVALID_ARGUMENT", "expected a TrainResult"),
                                                   lambda a, c: a.upload(c.info.task_id, eval_body(c))),
    "a result naming another client": Attack(R("PERMISSION_DENIED", "client-0"),
                                             lambda a, c: a.answer(c, train_body(c, client_id="client-0"))),
    "answering another client's task": Attack(R("NOT_FOUND", "no task"),
                                              lambda a, c: a.upload(forged_task_id(c),
                                                                    train_body(c, client_id="client-0"))),
    "downloading another client's task": Attack(R("NOT_FOUND", "not open"),
                                                lambda a, c: a.download(forged_task_id(c))),
    "polling as another client with its own token": Attack(
        R("PERMISSION_DENIED", "claims client 'client-0'", "belongs to 'client-3'"),
        lambda a, c: a.poll(0.0, md=a.md("client-0"))),
    "joining as another client": Attack(R("PERMISSION_DENIED", "cannot join as 'client-0'"),
                                        lambda a, c: a.join(pb.JoinRequest(client_id="client-0"))),
    "downloading as another client": Attack(R("PERMISSION_DENIED", "belongs to 'client-3'"),
                                            lambda a, c: a.download(c.info.task_id, md=a.md("client-0"))),
    "uploading as another client": Attack(R("PERMISSION_DENIED", "belongs to 'client-3'"),
                                          lambda a, c: a.upload(c.info.task_id, train_body(c, client_id="client-0"),
                                                                md=a.md("client-0"))),
    "polling without a token": Attack(R("UNAUTHENTICATED", "token"), lambda a, c: a.poll(0.0, md=a.md(token=None))),
    "polling with a forged token": Attack(R("UNAUTHENTICATED", "unknown or revoked"),
                                          lambda a, c: a.poll(0.0, md=a.md(token="0" * 43))),
    "join declaring 10**12 examples": Attack(
        R("INVALID_ARGUMENT", "at most"),
        lambda a, c: a.join(pb.JoinRequest(client_id=a.client_id, train_examples=10**12, test_examples=10**12))),
    "join declaring one count only": Attack(R("INVALID_ARGUMENT", "both"),
                                            lambda a, c: a.join(pb.JoinRequest(client_id=a.client_id,
                                                                               train_examples=10))),
    "join in another message format": Attack(R("FAILED_PRECONDITION", "format"),
                                             lambda a, c: a.join(md=a.md(fmt="1"))),
    "poll waiting NaN seconds": Attack(R("INVALID_ARGUMENT", "wait_seconds"), lambda a, c: a.poll(float("nan"))),
    "a huge hostile field echoed into the refusal": Attack(
        R("PERMISSION_DENIED", "client"),
        lambda a, c: a.answer(c, train_body(c, client_id="x" * 50_000))),
    # ----- the transport takes these; the round loop refuses them -----
    "count 10**12": Attack(Rejection("train task", "claims 1000000000000 training examples"),
                           lambda a, c: a.answer(c, train_body(c, count=10**12))),
    "answering twice": Attack(R("ALREADY_EXISTS", "already accepted"),
                              lambda a, c: a.answer(c, train_body(c))),
    "replaying an answered task": Attack(R("ALREADY_EXISTS", "already accepted"),
                                         lambda a, c: a.upload(a.task_ids[(1, "train")], a.bodies[(1, "train")])),
    "replaying last round's result on this round's task": Attack(
        R("PERMISSION_DENIED", "round 1"), lambda a, c: a.upload(c.info.task_id, a.bodies[(1, "train")])),
    "count 10**400": Attack(Rejection("train task", f"claims {10**400} training examples"),
                            lambda a, c: a.answer(c, train_body(c, count=10**400))),
    "a finite 1e38 update": Attack(Rejection("train task", "has norm inf"),
                                   lambda a, c: a.answer(c, train_body(c, update=torch.full((c.numel,), 1e38)))),
    "a float64 payload of 1e300": Attack(
        Rejection("train task", "is not a float32 vector"),
        lambda a, c: a.answer(c, train_body(c, update=torch.full((c.numel,), 1e300, dtype=torch.float64)))),
    "a NaN update": Attack(Rejection("train task", "contains NaN or Inf"),
                           lambda a, c: a.answer(c, train_body(c, update=torch.full((c.numel,), math.nan)))),
    "a negative count": Attack(Rejection("train task", "claims -1 training examples"),
                               lambda a, c: a.answer(c, train_body(c, count=-1))),
    "an infinite update": Attack(Rejection("train task", "contains NaN or Inf"),
                                 lambda a, c: a.answer(c, train_body(c, update=torch.full((c.numel,), math.inf)))),
    "an update far beyond the norm bound": Attack(
        Rejection("train task", "over 10x this round's limit"),
        lambda a, c: a.answer(c, train_body(c, update=torch.full((c.numel,), 10.0)))),
    "a zero count": Attack(Rejection("train task", "claims 0 training examples"),
                           lambda a, c: a.answer(c, train_body(c, count=0))),
    # ----- federated evaluation -----
    "evaluation count as a string": Attack(R("INVALID_ARGUMENT", "num_examples"),
                                           lambda a, c: a.answer(c, eval_body(c, count="70"))),
    "evaluation count inflated": Attack(Rejection("evaluation", "claims 1000000 test examples"),
                                        lambda a, c: a.answer(c, eval_body(c, count=10**6))),
    "evaluation answered twice": Attack(R("ALREADY_EXISTS", "already accepted"),
                                        lambda a, c: a.answer(c, eval_body(c))),
    "evaluation count 10**400": Attack(Rejection("evaluation", f"claims {10**400} test examples"),
                                       lambda a, c: a.answer(c, eval_body(c, count=10**400))),
    "evaluation accuracy NaN": Attack(Rejection("evaluation", "not finite numbers"),
                                      lambda a, c: a.answer(c, eval_body(c, metrics={"loss": 0.1,
                                                                                     "accuracy": math.nan}))),
    "evaluation accuracy 0.99999992 over an inflated count": Attack(
        Rejection("evaluation", "claims 100000 test examples"),
        lambda a, c: a.answer(c, eval_body(c, count=10**5, metrics={"loss": 0.0, "accuracy": 0.99999992,
                                                                    **sums(10**5, 10**5)}))),
    "evaluation accuracy above 1": Attack(Rejection("evaluation", "accuracy = 1.5, outside its range"),
                                          lambda a, c: a.answer(c, eval_body(c, metrics={"loss": 0.1,
                                                                                         "accuracy": 1.5}))),
    "evaluation sums that do not add up": Attack(
        Rejection("evaluation", "sums inconsistent"),
        lambda a, c: a.answer(c, eval_body(c, metrics={"loss": 0.1, "accuracy": 0.9, **sums(10, 9)}))),
    "evaluation accuracy 0.99999992 at its declared count": Attack(
        Weighed(None), lambda a, c: a.answer(c, eval_body(c, metrics={"loss": 0.0, "accuracy": 0.99999992}))),
    "a perfect score claimed on its own test set": Attack(
        Weighed(DECLARED[1]),
        lambda a, c: a.answer(c, eval_body(c, metrics={"loss": 0.0, "accuracy": 1.0,
                                                       **sums(DECLARED[1], DECLARED[1])}))),
    "binary counts forged into a 10-class evaluation": Attack(
        Rejection("evaluation", "not binary"), lambda a, c: a.answer(c, eval_body(c, metrics=FORGED_BINARY))),
}

ROUND_1_TRANSPORT = [name for name, attack in ATTACKS.items() if isinstance(attack.expect, Refusal)
                     and name not in {"answering twice", "replaying an answered task",
                                      "replaying last round's result on this round's task",
                                      "evaluation count as a string", "evaluation answered twice"}]


def plan(*names: str) -> list[tuple[str, Action]]:
    return [(name, ATTACKS[name].action) for name in names]


PLANS: dict[tuple[int, str], list[tuple[str, Action]]] = {
    (1, "train"): plan(*ROUND_1_TRANSPORT, "count 10**12", "answering twice"),
    (1, "evaluate"): plan("evaluation count as a string", "evaluation count inflated", "evaluation answered twice"),
    (2, "train"): plan("replaying an answered task", "replaying last round's result on this round's task",
                       "count 10**400"),
    (2, "evaluate"): plan("evaluation count 10**400"),
    (3, "train"): plan("a finite 1e38 update"),
    (3, "evaluate"): plan("evaluation accuracy NaN"),
    (4, "train"): plan("a float64 payload of 1e300"),
    (4, "evaluate"): plan("evaluation accuracy 0.99999992 over an inflated count"),
    (5, "train"): plan("a NaN update"),
    (5, "evaluate"): plan("evaluation accuracy above 1"),
    (6, "train"): plan("a negative count"),
    (6, "evaluate"): plan("evaluation sums that do not add up"),
    (7, "train"): plan("an infinite update"),
    (7, "evaluate"): plan("evaluation accuracy 0.99999992 at its declared count"),
    (8, "train"): plan("an update far beyond the norm bound"),
    (8, "evaluate"): plan("a perfect score claimed on its own test set"),
    (9, "train"): plan("a zero count"),
    (9, "evaluate"): plan("binary counts forged into a 10-class evaluation"),
}
FALLBACK: dict[str, Action] = {  # tasks no plan covers (none in a healthy run): refused as well
    "train": ATTACKS["a NaN update"].action,
    "evaluate": ATTACKS["evaluation accuracy NaN"].action,
}
assert {name for steps in PLANS.values() for name, _ in steps} == set(ATTACKS), "every attack is played once"
assert max(rnd for rnd, _ in PLANS) == ROUNDS


# ----- the runs --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished federation: its folder, processes and exit codes, and the attacker's record."""

    folder: Path
    procs: Procs
    attacker: Attacker
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.folder / "attacked"

    def rows(self) -> list[dict]:
        return rows(self.run_dir)

    def row(self, rnd: int) -> dict:
        found = [r for r in self.rows() if r["round"] == rnd]
        assert found, f"round {rnd} is not in metrics.jsonl (the run stopped after {len(self.rows())} rounds)"
        return found[0]

    def summary(self) -> dict:
        return strict_json((self.run_dir / "summary.json").read_text())

    def server_log(self) -> str:
        return self.procs.log("server")

    def rejections(self, rnd: int, what: str) -> list[str]:
        line = f"round {rnd}: rejected {what}: "
        return [ln.split(line, 1)[1] for ln in self.server_log().splitlines() if line in ln]


def attacked_federation(procs: Procs, config: dict, honest: tuple[str, ...], attacker: str,
                        declared: tuple[int, int], plans: dict, fallback: dict[str, Action]) -> Run:
    """`fedlearn server --tokens` on 127.0.0.1, a `fedlearn client` per ``honest`` id and ``attacker`` played by
    hand, through the whole run (every wait bounded); the caller kills what is left (``procs.stop_all``)."""
    folder = procs.folder
    cfg = write_config(folder / "run.yaml", **config)
    tokens = folder / "tokens.txt"
    for cid in (*honest, attacker):
        (folder / f"{cid}.token").write_text(issue_token(tokens, cid) + "\n")
    address = f"127.0.0.1:{free_port()}"
    server = procs.start("server", "server", "--config", str(cfg), "--address", address, "--output",
                         str(folder / "attacked"), "--tokens", str(tokens))
    for i, cid in enumerate(honest):
        procs.start(cid, "client", "--server", address, "--config", str(cfg), "--partition-index", str(i),
                    "--token-file", str(folder / f"{cid}.token"), "--give-up-after", "60")
    deadline = time.monotonic() + 60
    while "listening on" not in procs.log("server") and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    player = Attacker(address, attacker, (folder / f"{attacker}.token").read_text().strip(), server, plans,
                      fallback, declared)
    run = Run(folder, procs, player)
    player.thread.start()
    try:
        player.thread.join(RUN_LIMIT + 30)
    finally:
        player.channel.close()  # an attacker still playing ends here
    run.exit_codes["server"] = procs.wait("server", 60)
    for cid in honest:  # a server that did not finish leaves its clients waiting for it: do not wait long
        run.exit_codes[cid] = procs.wait(cid, 60 if run.exit_codes["server"] == 0 else 3)
    return run


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Iterator[Run]:
    """The module's attacked run, and beside it the same configuration un-attacked (`fedlearn run`)."""
    procs = Procs(tmp_path_factory.mktemp("hostile"))
    try:
        cfg = write_config(procs.folder / "unattacked.yaml", **CONFIG)
        procs.start("baseline", "run", "--quiet", "--config", str(cfg), "--output", str(procs.folder / "unattacked"))
        run = attacked_federation(procs, CONFIG, HONEST, ATTACKER, DECLARED, PLANS, FALLBACK)
        run.exit_codes["baseline"] = procs.wait("baseline", 120)
        yield run
    finally:
        procs.stop_all()


def baseline_summary(run: Run) -> dict:
    assert run.exit_codes["baseline"] == 0, run.procs.log("baseline")[-3000:]
    return strict_json((run.folder / "unattacked" / "summary.json").read_text())


@pytest.fixture(scope="module")
def honest_scores(attacked) -> dict[int, tuple[float, float]]:
    """Per round, (correct, examples) of the honest clients' own test sets on the weights that round evaluated
    (the weights the attacker's evaluation task carried), computed here by the clients' own code."""
    from fedlearn.data import load_dataset
    from fedlearn.protocol.messages import EvalTask
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import build_clients, client_app, initial_model

    config = RunConfig(**CONFIG).validate()
    bundle = load_dataset(config.dataset, config.data_dir, download=config.download)
    clients, _ = build_clients(config, bundle)
    app = client_app(config, initial_model(config, bundle), {cid: clients[cid] for cid in HONEST},
                     config.task_name or bundle.task)
    scores = {}
    for rnd, task in attacked.attacker.evaluated.items():
        answers = [app(EvalTask(rnd, cid, task.arrays, task.config)).metrics for cid in HONEST]
        scores[rnd] = (sum(m["sum.classification.correct"] for m in answers),
                       sum(m["sum.classification.n"] for m in answers))
    return scores


# ----- the run as a whole ----------------------------------------------------------------------------------


def test_the_attacker_played_every_round_to_the_end(attacked) -> None:
    assert attacked.attacker.end == "finished", attacked.attacker.end
    assert sorted(set(attacked.attacker.seen)) == sorted(PLANS), attacked.attacker.seen


def test_the_server_stays_up_and_exits_cleanly(attacked) -> None:
    down = [name for name, o in attacked.attacker.outcomes.items() if not o.serving]
    assert not down, f"the server stopped serving Join/health after: {down}"
    assert attacked.exit_codes["server"] == 0, attacked.server_log()[-3000:]
    assert "Traceback" not in attacked.server_log()
    assert "failed inside the server" not in attacked.server_log()


def test_the_honest_clients_finish_every_round(attacked) -> None:
    for cid in HONEST:
        assert attacked.exit_codes[cid] == 0, attacked.procs.log(cid)[-3000:]
        assert "run finished" in attacked.procs.log(cid)
    history = attacked.rows()
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    for row in history:
        assert row["clients_sampled"] == 4 and row["clients_succeeded"] == 3, row
        assert row["failed_clients"] == [ATTACKER] and row["aggregated"], row


def test_accuracy_is_within_two_points_of_the_unattacked_run(attacked) -> None:
    baseline = baseline_summary(attacked)
    assert baseline["final_accuracy"] > 0.9  # the un-attacked run learns: the comparison means something
    final = attacked.summary()["final_accuracy"]
    assert abs(final - baseline["final_accuracy"]) <= 0.02, (final, baseline["final_accuracy"])


def test_summary_and_metrics_hold_no_nan_and_no_inflated_accuracy(attacked) -> None:
    summary = attacked.summary()  # strict JSON: NaN or Infinity anywhere fails here
    for line in (attacked.run_dir / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    assert summary["rounds"] == ROUNDS
    assert summary["best_accuracy"] <= baseline_summary(attacked)["best_accuracy"] + 0.02
    assert all(row["test_accuracy"] is not None and row["fed_accuracy"] is not None for row in attacked.rows())


def test_federated_accuracy_is_the_honest_clients_own(attacked, honest_scores) -> None:
    """Every round whose evaluation the attacker could not make count scores exactly the honest clients' test sets."""
    weighed = {rnd for (rnd, kind), steps in PLANS.items() if kind == "evaluate"
               for name, _ in steps if isinstance(ATTACKS[name].expect, Weighed) and ATTACKS[name].expect.correct}
    assert sorted(honest_scores) == list(range(1, ROUNDS + 1))
    for rnd, (correct, n) in honest_scores.items():
        if rnd not in weighed:
            assert attacked.row(rnd)["fed_accuracy"] == pytest.approx(correct / n, abs=1e-12), rnd


# ----- each attack ----------------------------------------------------------------------------------------


def _attack_param(name: str):
    return pytest.param(name, id=name)


@pytest.mark.parametrize("name", [_attack_param(name) for name in ATTACKS])
def test_attack_is_refused(attacked, honest_scores, name: str) -> None:
    expect = ATTACKS[name].expect
    outcome = attacked.attacker.outcomes.get(name)
    assert outcome is not None, f"{name!r} was never played (the attacker's run ended: {attacked.attacker.end})"
    assert outcome.serving, f"the server stopped serving after {name!r}"
    if isinstance(expect, Refusal):
        assert outcome.code == expect.code, (
            f"{name!r}: expected {expect.code}, got {outcome.code}: {outcome.details[:300]}")
        assert outcome.details and "\n" not in outcome.details, outcome.details[:300]
        assert len(outcome.details) <= 1000, f"a {len(outcome.details)}-character message is not one line"
        for word in expect.words:
            assert word in outcome.details, outcome.details
        return
    assert outcome.code == "OK" and outcome.complete, (
        f"{name!r}: the transport should take this body (the round loop judges it), got {outcome.code}: "
        f"{outcome.details[:300]}")
    row = attacked.row(outcome.round)
    if isinstance(expect, Weighed):
        correct, n = honest_scores[outcome.round]
        most = correct / n if expect.correct is None else (correct + expect.correct) / (n + DECLARED[1])
        assert correct / n - 1e-12 <= row["fed_accuracy"] <= most + 1e-12, (
            f"{name!r} moved the federated accuracy to {row['fed_accuracy']}; the honest clients score "
            f"{correct / n}, and its declared {DECLARED[1]} examples allow at most {most}")
        return
    reasons = attacked.rejections(outcome.round, expect.what)
    assert any(expect.words in reason for reason in reasons), (
        f"{name!r}: no 'round {outcome.round}: rejected {expect.what}: ...{expect.words}...' in the server log; "
        f"its rejections that round: {reasons}")
    if expect.what == "train task":
        assert ATTACKER in row["failed_clients"], row
    if name == "binary counts forged into a 10-class evaluation":
        forged = [k for k in (*row, *attacked.summary()) if any(b in k for b in BINARY_WORDS)]
        assert not forged, f"{name!r} put {forged} into a 10-class run's metrics"


BINARY_WORDS = ("auc", "sensitivity", "specificity", "balanced_accuracy")


# ----- a second run: the ceiling at Join (a documented limit) and metrics too large to add ---------------------

SECOND = dict(dataset="digits", model="mcmahan-2nn", partition="iid", clients=2, rounds=3, local_epochs=1,
              fraction=1.0, min_clients=1, evaluation="centralized", round_timeout=20, seed=0)
SECOND_ATTACKER = "client-1"
CEILING = 10_000_000  # max_examples_per_client's default: the most a client may declare at Join
SECOND_PLANS = {
    (1, "train"): [("declare the ceiling, then claim it", lambda a, c: a.answer(c, train_body(c, count=CEILING)))],
    (2, "train"): [("a train loss of 1e308", lambda a, c: a.answer(c, train_body(c, count=2,
                                                                             metrics={"train_loss": 1e308})))],
    (3, "train"): [("a metric of 10**400", lambda a, c: a.answer(c, train_body(c, count=2,
                                                                             metrics={"train_loss": 10**400})))],
}


@pytest.fixture(scope="module")
def harmful(tmp_path_factory) -> Iterator[Run]:
    """One honest client and client-1, which declares the ceiling at Join (CEILING training examples): round 1 it
    sends a zero update weighted by them, round 2 a train loss of 1e308, round 3 a metric of 10**400."""
    procs = Procs(tmp_path_factory.mktemp("harmful"))
    try:
        yield attacked_federation(procs, SECOND, ("client-0",), SECOND_ATTACKER, (CEILING, 0), SECOND_PLANS, FALLBACK)
    finally:
        procs.stop_all()


def test_a_client_weighs_what_it_declared_at_join_within_the_ceiling(harmful) -> None:
    """The documented limit (README, 'What a participant can and cannot do'): a client that declares the ceiling
    at Join (accepted; one more is refused, see the shared run) weighs that much, so its zero update holds round 1
    back; --max-examples-per-client, set to the largest honest site, is the operator's control over it."""
    assert harmful.attacker.outcomes["declare the ceiling, then claim it"].complete
    row = harmful.row(1)
    assert row["clients_succeeded"] == 2 and SECOND_ATTACKER not in row["failed_clients"], row
    # one honest round on half of digits reaches ~0.8 (round 1 of the main run: 0.74); the untrained model ~0.1
    assert row["test_accuracy"] < 0.5, row


def test_a_claimed_train_loss_cannot_make_the_rounds_loss_infinite(harmful) -> None:
    assert harmful.attacker.outcomes["a train loss of 1e308"].complete
    loss = harmful.row(2)["train_loss"]
    assert loss is not None and math.isfinite(loss) and loss < 100, loss


def test_a_huge_integer_metric_is_rejected_not_fatal(harmful) -> None:
    outcome = harmful.attacker.outcomes["a metric of 10**400"]
    assert outcome.complete and outcome.serving, outcome
    assert harmful.exit_codes["server"] == 0, harmful.server_log()[-2000:]
    assert harmful.exit_codes["client-0"] == 0
    assert SECOND_ATTACKER in harmful.row(3)["failed_clients"]
    assert harmful.rejections(3, "train task"), harmful.server_log()[-2000:]
