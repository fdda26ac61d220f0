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
