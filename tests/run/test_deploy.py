"""`fedlearn server` and `fedlearn client` as real processes on 127.0.0.1: training, faults, security."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedlearn.cli import main
from processes import FEDLEARN, Procs, free_port, wait_for, write_config


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in out:
        row.pop("seconds", None)  # not published under central DP
    return out


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    return proc.wait(timeout=timeout)


def run_federation(procs: Procs, tmp_path: Path, server_cfg: Path, client_cfg: Path, clients: int,
                   *server_args: str, output: str = "grpc") -> list[dict]:
    """A server (given ``server_args`` too) and ``clients`` client processes through a whole run; the server's
    metrics rows."""
    port = free_port()
    server = procs.start("server", "server", "--config", str(server_cfg), "--address", f"127.0.0.1:{port}",
                         "--output", str(tmp_path / output), *server_args)
    started = [procs.start(f"client{i}", "client", "--server", f"127.0.0.1:{port}", "--config", str(client_cfg),
                           "--partition-index", str(i)) for i in range(clients)]
    assert finish(server) == 0, procs.log("server")
    assert all(finish(c, 30) == 0 for c in started), procs.log("client0")
    return rows(tmp_path / "grpc")


def test_five_client_processes_match_the_inprocess_run(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=5, rounds=8, round_timeout=60)
    grpc_rows = run_federation(procs, tmp_path, cfg, cfg, 5)
    assert main(["run", "--quiet", "--config", str(cfg), "--output", str(tmp_path / "sim")]) == 0
    sim_rows = rows(tmp_path / "sim")
    assert grpc_rows == sim_rows  # same seed: identical metrics, bytes included
    assert grpc_rows[-1]["test_accuracy"] >= 0.90
    assert "listening on 127.0.0.1" in procs.log("server") and "client client-3 connected" in procs.log("server")


def test_killed_client_is_dropped_then_rejoins(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=3, rounds=8, round_timeout=8, model="mcmahan-2nn",
                       local_epochs=1)
    port, run = free_port(), tmp_path / "run"
    server = procs.start("server", "server", "--config", str(cfg), "--address", f"127.0.0.1:{port}",
                         "--output", str(run))
    client_args = ["client", "--server", f"127.0.0.1:{port}", "--config", str(cfg)]
    procs.start("c0", *client_args, "--partition-index", "0")
    procs.start("c1", *client_args, "--partition-index", "1")
    victim = procs.start("c2", *client_args, "--partition-index", "2")
    wait_for(lambda: len(rows(run)) >= 1, 120, "round 1")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(lambda: any("client-2" in r["failed_clients"] for r in rows(run)), 60, "a round without client-2")
    procs.start("c2-again", *client_args, "--partition-index", "2")
    assert finish(server) == 0, procs.log("server")
    history = rows(run)
    assert [r["round"] for r in history] == list(range(1, 9))
    dropped = [r for r in history if "client-2" in r["failed_clients"]]
    assert dropped and all(r["aggregated"] and r["clients_succeeded"] == 2 for r in dropped)
    assert history[-1]["clients_succeeded"] == 3  # the restarted client is back
    assert "client client-2 connected" in procs.log("server")


def test_killed_server_resumes_and_runs_every_round_once(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=3, rounds=10, round_timeout=30, model="mcmahan-2nn",
                       local_epochs=4)
    port, run = free_port(), tmp_path / "run"
    address = f"127.0.0.1:{port}"
    server = procs.start("server", "server", "--config", str(cfg), "--address", address, "--output", str(run))
    clients = [procs.start(f"c{i}", "client", "--server", address, "--config", str(cfg), "--partition-index",
                           str(i)) for i in range(3)]
    wait_for(lambda: len(rows(run)) >= 3, 120, "three rounds")
    server.send_signal(signal.SIGKILL)
    server.wait()
    done_before = len(rows(run))
    assert done_before < 10
    restarted = procs.start("server2", "server", "--resume", str(run), "--address", address)
    assert finish(restarted) == 0, procs.log("server2")
    assert all(finish(c, 60) == 0 for c in clients), procs.log("c0")
    history = rows(run)
    assert [r["round"] for r in history] == list(range(1, 11))  # none lost, none repeated
    assert all(r["clients_succeeded"] == 3 for r in history)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 10


def test_mutual_tls_and_tokens_refuse_strangers_and_keep_serving(tmp_path, procs) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    for args in (["init"], ["issue", "server"], ["issue", "client-0"], ["issue", "client-1"]):
        assert main(["certs", *args, "--dir", str(certs)]) == 0
    assert main(["certs", "init", "--dir", str(other)]) == 0
    assert main(["certs", "issue", "client-1", "--dir", str(other)]) == 0
    tokens = tmp_path / "tokens.txt"
    token_files = {}
    for name in ("client-0", "client-1"):
        from fedlearn.security import TokenStore

        token_files[name] = tmp_path / f"{name}.token"
        token_files[name].write_text(TokenStore(tokens, missing_ok=True).add(name))
    cfg = write_config(tmp_path / "run.yaml", clients=2, rounds=3, round_timeout=20, model="mcmahan-2nn",
                       local_epochs=1, min_clients=1)
    port, run = free_port(), tmp_path / "run"
    target = f"localhost:{port}"
    server = procs.start("server", "server", "--config", str(cfg), "--address", f"127.0.0.1:{port}", "--output",
                         str(run), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
                         "--client-ca", str(certs / "ca.pem"), "--tokens", str(tokens))
    base = ["client", "--server", target, "--config", str(cfg), "--ca", str(certs / "ca.pem"), "--give-up-after", "20"]
    no_cert = procs.start("no-cert", *base, "--partition-index", "1", "--token-file", str(token_files["client-1"]))
    foreign = procs.start("foreign", *base, "--partition-index", "1", "--cert", str(other / "client-1.pem"),
                          "--key", str(other / "client-1.key"), "--token-file", str(token_files["client-1"]))
    bad_token = tmp_path / "bad.token"
    bad_token.write_text("not-a-token")
    wrong_token = procs.start("wrong-token", *base, "--partition-index", "1", "--cert", str(certs / "client-1.pem"),
                              "--key", str(certs / "client-1.key"), "--token-file", str(bad_token))
    for proc in (no_cert, foreign, wrong_token):
        assert finish(proc, 60) == 2, procs.log(proc.name)
        lines = [ln for ln in procs.log(proc.name).splitlines() if ln.startswith("fedlearn: error:")]
        assert len(lines) == 1, procs.log(proc.name)
    assert re.search(r"client certificate", procs.log("no-cert"))
    assert "unknown or revoked client token" in procs.log("wrong-token")
    assert server.poll() is None  # still serving
    good = [procs.start(f"good{i}", *base, "--partition-index", str(i), "--cert", str(certs / f"client-{i}.pem"),
                        "--key", str(certs / f"client-{i}.key"), "--token-file", str(token_files[f"client-{i}"]))
            for i in range(2)]
    assert finish(server) == 0, procs.log("server")
    assert all(finish(g, 30) == 0 for g in good)
    assert [r["clients_succeeded"] for r in rows(run)] == [2, 2, 2]
    assert "TLS, mutual TLS, bearer tokens" in procs.log("server")


def test_plaintext_off_loopback_is_refused(tmp_path) -> None:
    proc = subprocess.run([*FEDLEARN, "server", "--address", "0.0.0.0:0", "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "without TLS" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")


def test_sigterm_stops_the_server_gracefully_with_json_logs(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=2, rounds=2)
    server = procs.start("server", "server", "--config", str(cfg), "--address", f"127.0.0.1:{free_port()}",
                         "--output", str(tmp_path / "run"), "--log-format", "json")
    wait_for(lambda: "waiting for clients" in procs.log("server"), 60, "the server to listen")
    server.send_signal(signal.SIGTERM)
    assert finish(server, 30) == 143  # 128 + SIGTERM: stopped, not finished
    entries = [json.loads(line) for line in procs.log("server").splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert "continue with: fedlearn server --resume" in entries[-1]["message"]


def test_a_crashed_or_interrupted_server_keeps_its_clients_waiting_and_resume_finishes(tmp_path, procs) -> None:
    """A fault in the driver, then Ctrl-C: each time the clients wait (never "run finished") and rejoin."""
    from fedlearn.run.config import RunConfig
    from fedlearn.run.deploy import serve

    values = dict(clients=2, rounds=5, round_timeout=30, model="mcmahan-2nn", local_epochs=1)
    cfg = write_config(tmp_path / "run.yaml", **values)
    address, run = f"127.0.0.1:{free_port()}", tmp_path / "run"
    clients = [procs.start(f"c{i}", "client", "--server", address, "--config", str(cfg), "--partition-index", str(i),
                           "--give-up-after", "120") for i in range(2)]

    def fault(row: dict) -> None:
        if row["round"] == 2:
            raise RuntimeError("a fault in the driver")

    with pytest.raises(RuntimeError, match="a fault in the driver"):
        serve(RunConfig(output=str(run), **values).validate(), address, callbacks=[fault])
    time.sleep(2.0)
    assert all(c.poll() is None for c in clients), procs.log("c0")
    assert "run finished" not in procs.log("c0") + procs.log("c1")

    interrupted = procs.start("server2", "server", "--resume", str(run), "--address", address)
    wait_for(lambda: len(rows(run)) >= 3, 120, "round 3 on the resumed server")
    interrupted.send_signal(signal.SIGINT)
    assert finish(interrupted, 60) == 130, procs.log("server2")  # 128 + SIGINT
    assert "continue with: fedlearn server --resume" in procs.log("server2")
    time.sleep(1.0)
    assert all(c.poll() is None for c in clients), procs.log("c0")
    assert "server is stopping before the run is over" in procs.log("c0") + procs.log("c1")

    final = procs.start("server3", "server", "--resume", str(run), "--address", address)
    assert finish(final) == 0, procs.log("server3")
    assert all(finish(c, 60) == 0 for c in clients), procs.log("c0")
    assert [r["round"] for r in rows(run)] == [1, 2, 3, 4, 5]  # none lost, none repeated
    assert all("run finished" in procs.log(f"c{i}") for i in range(2))


def test_a_plaintext_client_of_a_tls_server_exits_2_and_the_server_log_stays_clean(tmp_path, procs) -> None:
    certs = tmp_path / "certs"
    for args in (["init"], ["issue", "server"]):
        assert main(["certs", *args, "--dir", str(certs)]) == 0
    cfg = write_config(tmp_path / "run.yaml", clients=1, rounds=1)
    address = f"127.0.0.1:{free_port()}"
    server = procs.start("server", "server", "--config", str(cfg), "--address", address, "--output",
                         str(tmp_path / "run"), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"))
    wait_for(lambda: "listening on" in procs.log("server"), 60, "the server to listen")
    client = procs.start("plain", "client", "--server", address, "--config", str(cfg), "--partition-index", "0")
    assert finish(client, 60) == 2, procs.log("plain")
    errors = [ln for ln in procs.log("plain").splitlines() if ln.startswith("fedlearn: error:")]
    assert len(errors) == 1 and "speaks TLS" in errors[0] and "--ca" in errors[0], procs.log("plain")
    assert "Traceback" not in procs.log("plain")
    server.send_signal(signal.SIGTERM)
    assert finish(server, 30) == 143
    assert "Handshake failed" not in procs.log("server") and "ssl_transport_security" not in procs.log("server")


def test_ctrl_c_on_a_client_says_how_to_rejoin_not_resume(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=1, rounds=1)
    client = procs.start("c0", "client", "--server", f"127.0.0.1:{free_port()}", "--config", str(cfg),
                         "--partition-index", "0")
    wait_for(lambda: "waiting for the server" in procs.log("c0"), 60, "the client to wait for its server")
    client.send_signal(signal.SIGINT)
    assert finish(client, 30) == 130
    assert "rejoin" in procs.log("c0") and "--resume" not in procs.log("c0")


def test_secure_aggregation_over_grpc_matches_the_simulation(tmp_path, procs) -> None:
    cfg = write_config(tmp_path / "run.yaml", clients=4, rounds=3, round_timeout=60,
                       secure_aggregation="secagg", secagg_threshold=3, secagg_max_weight=1000,
                       client_test_fraction=0.2)
    grpc_rows = run_federation(procs, tmp_path, cfg, cfg, 4)
    assert main(["run", "--quiet", "--config", str(cfg), "--output", str(tmp_path / "sim")]) == 0
    sim_rows = rows(tmp_path / "sim")
    # Masks differ between the runs (fresh keys) yet cancel exactly: the unmasked sums are identical.
    assert [r["test_accuracy"] for r in grpc_rows] == [r["test_accuracy"] for r in sim_rows]
    assert all(r["secure_aggregation"] == "secagg" and r["clients_succeeded"] == 4 for r in grpc_rows)


def test_ckks_over_grpc_server_has_only_the_public_context(tmp_path, procs) -> None:
    keys = tmp_path / "keys"
    assert main(["he", "keygen", "--dir", str(keys)]) == 0
    server_keys = tmp_path / "server_keys"  # what the coordinator is given: public.ctx, nothing else
    server_keys.mkdir()
    (server_keys / "public.ctx").write_bytes((keys / "public.ctx").read_bytes())
    base = {"clients": 3, "rounds": 2, "round_timeout": 60, "he": "ckks", "he_key_holder": "client-0",
            "secagg_max_weight": 1000}
    server_cfg = write_config(tmp_path / "server.yaml", **base, he_keys=str(server_keys))
    client_cfg = write_config(tmp_path / "client.yaml", **base, he_keys=str(keys))
    refused = subprocess.run([*FEDLEARN, "server", "--config", str(client_cfg),
                              "--address", "127.0.0.1:0", "--insecure", "--allow-any-client"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "only clients may hold" in refused.stderr  # the server must not hold secrets
    grpc_rows = run_federation(procs, tmp_path, server_cfg, client_cfg, 3)
    plain_cfg = write_config(tmp_path / "plain.yaml", clients=3, rounds=2)
    assert main(["run", "--quiet", "--config", str(plain_cfg), "--output", str(tmp_path / "sim")]) == 0
    sim_rows = rows(tmp_path / "sim")
    assert all(r["secure_aggregation"] == "ckks" and r["clients_succeeded"] == 3 for r in grpc_rows)
    for encrypted, plain in zip(grpc_rows, sim_rows):
        assert encrypted["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=0.005)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_central_dp_budget_stop_over_grpc_ends_at_the_simulations_round(tmp_path, procs) -> None:
    """B1: with --target-mode stop the server must stop before the round that would exceed the budget, exactly
    where `fedlearn run` stops (the accountant depends only on q, z, delta and rounds), and its clients exit."""
    cfg = write_config(tmp_path / "run.yaml", clients=4, fraction=0.5, local_epochs=1, round_timeout=60)
    # a small clip norm keeps the noised model finite, so every sampled client's answer is accepted
    dp = ["--dp", "central", "--noise-multiplier", "2.0", "--clip-norm", "0.05", "--target-epsilon", "3",
          "--target-mode", "stop", "--rounds", "40"]
    grpc_rows = run_federation(procs, tmp_path, cfg, cfg, 4, *dp)
    # under central DP the cohort's size and ids are not published (only what epsilon covers); the Poisson
    # coins are secret, so a round may sample nobody (1 in 16 here) and the rounds differ from the simulation's
    assert not any({"clients_sampled", "clients_succeeded", "failed_clients"} & set(r) for r in grpc_rows)
    assert main(["run", "--quiet", "--config", str(cfg), *dp, "--output", str(tmp_path / "sim")]) == 0
    sim_rows = rows(tmp_path / "sim")
    assert [r["round"] for r in sim_rows] == [1, 2, 3, 4]
    assert [r["round"] for r in grpc_rows] == [r["round"] for r in sim_rows]
    assert [r["epsilon"] for r in grpc_rows] == [r["epsilon"] for r in sim_rows]
    assert all(r["epsilon"] <= 3 for r in grpc_rows)
    grpc_summary, sim_summary = summary(tmp_path / "grpc"), summary(tmp_path / "sim")
    keys = ("rounds", "epsilon", "delta", "noise_multiplier", "sampling", "sampling_rate", "rounds_accounted")
    assert {k: grpc_summary[k] for k in keys} == {k: sim_summary[k] for k in keys}
    assert grpc_summary["rounds"] == 4 and grpc_summary["epsilon"] <= 3


def test_client_without_test_data_answers_evaluation_with_zero_examples_as_in_process(tmp_path, procs) -> None:
    """One client holds no test data: over gRPC it answers every evaluation with 0 examples and no metrics, so
    the pooled federated figures are those of the simulation, where it answers the same way."""
    cfg = write_config(tmp_path / "run.yaml", clients=3, rounds=2, local_epochs=1, round_timeout=60, seed=6,
                       partition="quantity", client_test_fraction=0.03, evaluation="both")
    grpc_rows = run_federation(procs, tmp_path, cfg, cfg, 3)
    assert main(["run", "--quiet", "--config", str(cfg), "--output", str(tmp_path / "sim")]) == 0
    partition = json.loads((tmp_path / "sim" / "partition.json").read_text())
    tests = sorted(p["num_test"] for p in partition)
    assert tests[0] == 0 and tests[1] > 0, tests  # one client without test data, the others with some
    sim_rows = rows(tmp_path / "sim")
    assert all(r["clients_succeeded"] == 3 and not r["failed_clients"] for r in grpc_rows)
    assert all(r["fed_accuracy"] is not None and r["fed_loss"] is not None for r in grpc_rows)
    fed = [{k: v for k, v in r.items() if k.startswith("fed_")} for r in grpc_rows]
    assert fed == [{k: v for k, v in r.items() if k.startswith("fed_")} for r in sim_rows]
    assert grpc_rows == sim_rows  # same seed: identical rows, bytes included


def test_scaffold_over_grpc_matches_the_simulation_with_each_client_keeping_its_control(tmp_path, procs) -> None:
    """SCAFFOLD's client control lives with the client process (its own state folder), not on the server; the
    controls it sends back make the gRPC run the simulation's, row for row."""
    cfg = write_config(tmp_path / "run.yaml", clients=2, rounds=2, local_epochs=1, round_timeout=60,
                       algorithm="scaffold")
    grpc_rows = run_federation(procs, tmp_path, cfg, cfg, 2)
    assert main(["run", "--quiet", "--config", str(cfg), "--output", str(tmp_path / "sim")]) == 0
    assert grpc_rows == rows(tmp_path / "sim")
    assert all(r["clients_succeeded"] == 2 for r in grpc_rows)
    run_id = (tmp_path / "grpc" / "run_id").read_text().strip()
    for i in range(2):  # each client's control in its own folder beside where it ran, under the run's id
        (folder,) = (tmp_path / "fedlearn-client-state").glob(f"client-{i}-*")
        (run_folder,) = folder.iterdir()
        assert run_folder.name.startswith(run_id[:40]), (run_folder, run_id)
        kept = sorted(p.name.rsplit("-", 1)[1] for p in run_folder.iterdir())  # a server may fall back a checkpoint
        assert kept == ["1.pt", "2.pt"], sorted(run_folder.iterdir())
    assert not list((tmp_path / "grpc").glob("client_state*"))  # the server holds no client's control
    # The same client processes' folders, a new run: the old run's controls must not leak into it.
    again = run_federation(procs, tmp_path, cfg, cfg, 2, output="grpc2")
    assert again == grpc_rows
    assert all(len(list(folder.iterdir())) == 2 for folder in (tmp_path / "fedlearn-client-state").iterdir())


def test_client_refuses_seeded_privacy(tmp_path, capsys) -> None:
    args = ["client", "--server", f"127.0.0.1:{free_port()}", "--partition-index", "0", "--seeded-privacy",
            "--give-up-after", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("fedlearn: error: seeded_privacy"), err
    assert "simulations only" in err[-1]
