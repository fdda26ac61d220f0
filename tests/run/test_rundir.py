"""The run directory's id: made once, kept across --resume, refused when damaged."""

import pytest

from fedlearn.errors import CheckpointError
from fedlearn.run.rundir import RUN_ID, RunDir


def test_the_run_id_is_made_once_and_read_back_by_a_resumed_process(tmp_path) -> None:
    first = RunDir(tmp_path).run_id
    assert len(first) == 32 and int(first, 16) >= 0
    assert RunDir(tmp_path).run_id == first  # a new process on the same folder (a resumed server)
    (tmp_path / "other").mkdir()
    assert RunDir(tmp_path / "other").run_id != first  # another run, another id


def test_a_damaged_run_id_is_refused_with_what_to_do(tmp_path) -> None:
    (tmp_path / RUN_ID).write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="damaged.*restore it or start a new run"):
        _ = RunDir(tmp_path).run_id


# ----- a new run's folder: unique, made before anything is built -------------------------------------------------

def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    from fedlearn.run.rundir import default_run_dir

    second = datetime(2026, 12, 1, 9, 30, 5)
    first, again = default_run_dir(tmp_path, now=second), default_run_dir(tmp_path, now=second)
    assert (first.name, again.name) == ("20261201-093005", "20261201-093005-2")
    with ThreadPoolExecutor(8) as pool:  # racing processes: mkdir is atomic, so each gets its own
        racing = list(pool.map(lambda _: default_run_dir(tmp_path, now=second), range(8)))
    made = {first, again, *racing}
    assert len(made) == 10 and all(p.is_dir() and not any(p.iterdir()) for p in made)


def test_a_default_run_folder_that_cannot_be_made_is_one_line(tmp_path) -> None:
    from fedlearn.errors import ConfigError
    from fedlearn.run.rundir import default_run_dir

    (tmp_path / "runs").write_text("a file where the runs folder goes")
    with pytest.raises(ConfigError, match="cannot create the run folder .*; give --output"):
        default_run_dir(tmp_path / "runs")


def test_create_reports_whether_it_made_the_folder_and_discard_removes_only_an_unused_one(tmp_path) -> None:
    fresh = RunDir(tmp_path / "a" / "b")
    assert fresh.create() is True and fresh.path.is_dir()
    (fresh.path / "client_state").mkdir()
    fresh.discard_if_unused()
    assert not fresh.path.exists()
    used = RunDir(tmp_path / "used")
    assert used.create() is True
    (used.path / "metrics.jsonl").write_text("")
    used.discard_if_unused()
    assert (used.path / "metrics.jsonl").exists()
    assert RunDir(tmp_path / "used").create() is False  # it was there already


# ----- resume: config.yaml must still hold the settings the run started with ----------------------------------

def _started(tmp_path):
    from fedlearn.run.config import RunConfig

    run = RunDir(tmp_path / "run")
    config = RunConfig(rounds=3, clients=4, output=str(run.path))
    run.start(config, [])
    return run, config


def _edit(run: RunDir, **changes) -> None:
    import yaml

    path = run.path / "config.yaml"
    values = yaml.safe_load(path.read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def test_resume_refuses_each_changed_setting_naming_both_values(tmp_path) -> None:
    from fedlearn.errors import ConfigError

    run, _ = _started(tmp_path)
    _edit(run, lr=0.5, clients=6, seed=3)
    with pytest.raises(ConfigError) as refused:
        run.config_for_resume()
    message = str(refused.value)
    assert "lr 0.1 -> 0.5" in message and "clients 4 -> 6" in message and "seed 0 -> 3" in message
    assert "\n" not in message and "only rounds, output, data_dir" in message


def test_resume_refuses_a_component_setting_added_to_config_yaml(tmp_path) -> None:
    from fedlearn.errors import ConfigError

    run, _ = _started(tmp_path)
    _edit(run, server_lr=0.5)
    with pytest.raises(ConfigError, match="server_lr 1.0 -> 0.5|server_lr 0.01 -> 0.5"):
        run.config_for_resume()


def test_resume_takes_the_settings_that_may_change(tmp_path) -> None:
    run, config = _started(tmp_path)
    _edit(run, rounds=9, threads=2, device="auto", data_dir="/elsewhere", download=False, round_timeout=60.0,
          output="/where/it/was/made")
    resumed = run.config_for_resume(rounds=12)
    assert (resumed.rounds, resumed.threads, resumed.device, resumed.data_dir) == (12, 2, "auto", "/elsewhere")
    assert resumed.output == str(run.path)  # the folder it is now in, wherever it was made
    assert resumed.lr == config.lr and resumed.clients == config.clients


def test_a_run_folder_without_a_record_gets_one_from_its_config(tmp_path, caplog) -> None:
    from fedlearn.errors import ConfigError
    from fedlearn.run.rundir import STARTED

    run, _ = _started(tmp_path)
    (run.path / STARTED).unlink()  # a folder an older release made
    run.config_for_resume(record=False)
    assert not (run.path / STARTED).exists()  # a dry run writes nothing
    run.config_for_resume()
    assert (run.path / STARTED).is_file() and "has no" in caplog.text
    _edit(run, lr=0.3)
    with pytest.raises(ConfigError, match="lr 0.1 -> 0.3"):
        run.config_for_resume()
