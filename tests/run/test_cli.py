"""`fedlearn run`: the default job, the run directory it writes, YAML configs and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedlearn.cli import main
from fedlearn.models import build_model
from fedlearn.run.config import RunConfig

METRIC_KEYS = {"round", "test_accuracy", "test_loss", "train_loss", "clients_sampled", "clients_succeeded",
               "bytes_up", "bytes_down", "seconds"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """One `fedlearn run` with no arguments but --output (and --quiet), shared by the checks below."""
    out = tmp_path_factory.mktemp("default") / "run"
    assert main(["run", "--quiet", "--output", str(out)]) == 0
    return out


def test_default_run_reaches_090(default_run: Path) -> None:
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.90
    assert summary["algorithm"] == "fedavg" and summary["dataset"] == "digits" and summary["rounds"] == 20
    assert summary["wall_seconds"] > 0


def test_run_directory_contents(default_run: Path) -> None:
    config = yaml.safe_load((default_run / "config.yaml").read_text())
    # fully resolved, every key: centralized evaluation records the client test share it used, none
    assert config == RunConfig(output=str(default_run), client_test_fraction=0.0, clients=10).to_dict()

    partition = json.loads((default_run / "partition.json").read_text())
    assert len(partition) == 10
    assert {"client_id", "num_train", "num_test", "label_counts"} <= set(partition[0])
    assert sum(p["num_train"] + p["num_test"] for p in partition) == 1437  # digits' training split
    assert all(p["num_test"] == 0 for p in partition)  # nobody evaluates on clients: they train on all of it
    assert all(sum(p["label_counts"]) == p["num_train"] for p in partition)

    rows = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, 21))
    assert all(METRIC_KEYS <= set(r) for r in rows)
    assert all(r["clients_sampled"] == r["clients_succeeded"] == 10 for r in rows)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]

    state = torch.load(default_run / "model.pt", weights_only=True)
    model = build_model("seed-cnn", (1, 8, 8), 10)
    model.load_state_dict(state)
    assert (default_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_config_and_flag_override(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rounds: 2\nclients: 4\nlocal-epochs: 1\npartition: iid\nmodel: mcmahan-2nn\nlr: 0.05\n")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--config", str(cfg), "--clients", "3", "--output", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["rounds"], config["clients"], config["local_epochs"], config["partition"]) == (2, 3, 1, "iid")
    assert config["model"] == "mcmahan-2nn"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--rounds", "-1"], "--rounds"),
        (["--fraction", "1.5"], "--fraction"),
        (["--fraction", "0"], "--fraction"),
        (["--alpha", "0"], "--alpha"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--model", "vgg"], "--model"),
        (["--algorithm", "fedfoo"], "--algorithm"),
        (["--partition", "random"], "--partition"),
        (["--clients", "5000"], "--clients"),
        (["--dataset", "mnist", "--data-dir", "{empty}", "--no-download"], "train-images-idx3-ubyte.gz"),
    ],
)
def test_bad_config_exits_2_with_one_line(args: list[str], field: str, tmp_path: Path, capsys) -> None:
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    assert main(["run", "--quiet", "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_yaml_key_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rounds: 2\nlearning_rate: 0.1\n")
    assert main(["run", "--quiet", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "known keys" in err


def test_bad_yaml_type_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rounds: many\n")
    assert main(["run", "--quiet", "--config", str(cfg)]) == 2
    assert "--rounds must be an integer" in capsys.readouterr().err


def test_cli_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedlearn.cli", "run", "--rounds", "0", "--output", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedlearn: error: --rounds must be a positive integer; got 0"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [("fedsgd", ["--lr", "0.5"]), ("fedprox", ["--mu", "0.1"])],
)
def test_other_algorithms_learn_through_the_cli(algorithm: str, extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--quiet", "--algorithm", algorithm, "--rounds", "8", "--model", "mcmahan-2nn",
            "--partition", "iid", "--evaluation", "both", "--output", str(out), *extra]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.1
    assert all(r["fed_accuracy"] is not None and r["fed_loss"] is not None for r in rows)


def test_mnist_from_shared_files_with_shards(shared_dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--quiet", "--dataset", "mnist", "--data-dir", str(shared_dataset("mnist")), "--model",
            "mcmahan-2nn", "--clients", "100", "--fraction", "0.05", "--partition", "shards", "--rounds", "2",
            "--local-epochs", "1", "--batch-size", "50", "--no-download", "--output", str(out)]
    assert main(args) == 0
    partition = json.loads((out / "partition.json").read_text())
    assert sum(p["num_train"] + p["num_test"] for p in partition) == 60000
    assert max(sum(1 for c in p["label_counts"] if c) for p in partition) <= 4  # 2 shards, each <= 2 labels
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] > 0.25  # chance is 0.10


def test_femnist_writers_are_the_clients(shared_dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--quiet", "--dataset", "femnist", "--data-dir", str(shared_dataset("femnist_leaf")),
            "--model", "mcmahan-2nn", "--clients", "5", "--partition", "natural", "--rounds", "1",
            "--local-epochs", "1", "--evaluation", "federated", "--no-download", "--output", str(out)]
    assert main(args) == 0
    partition = json.loads((out / "partition.json").read_text())
    assert [p["client_id"][0] for p in partition] == ["f"] * 5  # LEAF writer ids such as f3313_11
    assert all(p["num_test"] > 0 for p in partition)


def test_natural_partition_without_clients_takes_every_writer(shared_dataset, tmp_path: Path, capsys) -> None:
    data = ["--dataset", "femnist", "--data-dir", str(shared_dataset("femnist_leaf")), "--no-download"]
    assert main(["run", "--dry-run", *data, "--partition", "natural"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["clients"] == 105  # every LEAF writer in the file
    assert main(["run", "--dry-run", *data, "--partition", "natural", "--clients", "7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["clients"] == 7  # a given count is kept (with a warning)
    assert main(["run", "--dry-run", *data, "--partition", "iid"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["clients"] == 10  # the default elsewhere
    assert main(["run", "--dry-run", "--partition", "natural"]) == 2  # digits has no writers
    assert "natural owners such as femnist, and digits has none" in capsys.readouterr().err


def test_run_help_shows_the_registry_flags_with_their_defaults(capsys) -> None:
    from fedlearn.registry import names

    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert "--algorithm ALGORITHM" in text and "--server-lr SERVER_LR" in text
    text = text.split(" options: ", 1)[1]  # the flags' help, after the usage line
    algorithm_help = text.split("--algorithm ALGORITHM ", 1)[1].split(" --task TASK")[0]
    assert all(name in algorithm_help for name in names("strategy")), algorithm_help
    assert "(default fedavg)" in algorithm_help
    server_lr_help = text.split("--server-lr SERVER_LR ", 1)[1].split(" --server-")[0]
    assert "(default 1 for sgd" in server_lr_help and "0.01 for adaptive" in server_lr_help, server_lr_help
    assert "--rounds ROUNDS federated rounds (with --resume: total rounds to reach) (default 20)" in text


def test_fedadam_with_a_server_lr_runs_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--algorithm", "fedadam", "--server-lr", "0.01", "--rounds", "2", "--output",
                 str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["algorithm"], config["server_lr"]) == ("fedadam", 0.01)
    assert json.loads((out / "summary.json").read_text())["algorithm"] == "fedadam"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["aggregated"] for r in rows)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam"])
def test_negative_server_lr_exits_2_with_one_line_before_writing_anything(algorithm: str, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--algorithm", algorithm, "--server-lr", "-1", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--server-lr" in err, err
    assert not out.exists()  # refused while validating, before the run directory is made


def _help_entries(command: str, capsys) -> dict[str, str]:
    """Each flag of `fedlearn COMMAND --help` and its help text, unwrapped."""
    import re

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", "\n" + text):
        block = " ".join(block.split())
        if block.startswith("-"):
            flag = block.split()[0].rstrip(",")
            entries[flag if flag != "-h" else "--help"] = block
    return entries


@pytest.mark.parametrize("command", ["run", "server", "client"])
def test_help_shows_a_default_for_every_flag(command: str, capsys) -> None:
    entries = _help_entries(command, capsys)
    assert len(entries) > 40  # the config flags, the registry's component flags and the command's own
    missing = [flag for flag, text in entries.items()
               if flag != "--help" and "default" not in text and "(required)" not in text]
    assert not missing, missing
    assert "(default 0.9)" in entries["--server-beta1"]  # shared by several optimizers, with one default
    assert "(default off)" in entries["--no-download"]
    if command == "run":
        assert "(default 0.2 with --evaluation federated or both; 0 with centralized" in entries[
            "--client-test-fraction"]


@pytest.mark.parametrize("command", ["run", "server", "client"])
def test_an_unknown_flag_is_the_subcommands_usage_and_one_error_line(command: str, capsys) -> None:
    extra = ["--server", "127.0.0.1:1"] if command == "client" else []
    assert main([command, *extra, "--learning-rate", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"usage: fedlearn {command} [options] (fedlearn {command} --help lists them)",
                   "fedlearn: error: unrecognized arguments: --learning-rate 0.1"]


def test_a_bad_type_is_one_usage_line_and_one_error_line(capsys) -> None:
    assert main(["run", "--lr", "abc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "usage: fedlearn run [options] (fedlearn run --help lists them)",
        "fedlearn: error: argument --lr: invalid float value: 'abc'"]
    assert main(["certs", "renew"]) == 2  # a short usage stays whole, on one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: fedlearn certs [-h]") and "invalid choice: 'renew'" in err[1]


def test_dry_run_prints_the_resolved_config_and_makes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--dry-run", "--rounds", "3", "--evaluation", "both", "--output", str(out)]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["rounds"], config["client_test_fraction"], config["output"]) == (3, 0.2, str(out))
    assert not out.exists()


def test_an_error_message_carrying_a_line_break_is_still_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "two\nlines"
    folder.write_text("a file")
    assert main(["run", "--quiet", "--output", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two\\nlines is a file" in err


def test_an_undecodable_argument_in_a_usage_error_is_shown_escaped(capsys) -> None:
    # found by the config fuzzer: argparse's message quoting a lone surrogate could not be written to stderr
    assert main(["run", "--dry-run", "--clients=\udcff"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("fedlearn: error: argument --clients: invalid int value: '\\udcff'\n")
