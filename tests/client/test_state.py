"""Tests for ClientStateStore: memory and disk round trips, resume rewinding, pruning, LRU memory bound, restarts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from fedlearn.client.state import ClientStateStore
from fedlearn.errors import CheckpointError, InvalidUpdateError

torch.set_num_threads(1)


def arrays(seed: int, n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"c": torch.randn(n, generator=g), "w.bias": torch.randn(2, 3, generator=g)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reload(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def pt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".pt")


# -- in memory ---------------------------------------------------------------------------------


def test_memory_put_get_round_trip_copies_the_callers_tensors() -> None:
    store = ClientStateStore()
    src = arrays(0)
    store.put("a", src, 3)
    expected = {k: v.clone() for k, v in src.items()}
    src["c"].add_(1.0)  # the caller reuses its buffer
    assert same(store.get("a"), expected)
    assert store.get("nobody") == {}
    assert store.version("a") == 3 and store.version("nobody") is None
    assert "a" in store and "b" not in store and len(store) == 1 and store.client_ids() == ["a"]


def test_memory_state_dict_round_trips_through_weights_only_load() -> None:
    store = ClientStateStore()
    store.put("a", arrays(0), 1)
    store.put("b", arrays(1), 2)
    state = reload(store.state_dict())
    fresh = ClientStateStore()
    fresh.load_state_dict(state)
    assert fresh.client_ids() == ["a", "b"]
    assert fresh.version("a") == 1 and fresh.version("b") == 2
    assert same(fresh.get("a"), arrays(0)) and same(fresh.get("b"), arrays(1))


def test_put_stores_detached_contiguous_cpu_tensors() -> None:
    store = ClientStateStore()
    t = torch.randn(4, 3, requires_grad=True)
    store.put("a", {"t": t.t()}, 0)
    got = store.get("a")["t"]
    assert got.device.type == "cpu" and got.is_contiguous() and not got.requires_grad
    assert torch.equal(got, t.detach().t())


# -- on disk -----------------------------------------------------------------------------------


def test_disk_commit_then_new_store_reads_identical_tensors(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path, max_cached=1)
    store.put("a", arrays(0), 1)
    store.put("b", arrays(1), 1)
    with pytest.raises(RuntimeError, match="commit"):
        store.state_dict()
    store.commit()
    state = reload(store.state_dict())
    assert not any(isinstance(v, torch.Tensor) for v in state["clients"].values())
    assert state["clients"] == {"a": 1, "b": 1}
    fresh = ClientStateStore(tmp_path)
    fresh.load_state_dict(state)
    assert same(fresh.get("a"), arrays(0)) and same(fresh.get("b"), arrays(1))


def test_resume_from_earlier_checkpoint_ignores_and_deletes_a_crashed_rounds_state(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put("a", arrays(1), 1)
    store.commit()
    checkpoint_at_1 = reload(store.state_dict())
    store.put("a", arrays(2), 2)  # round 2 commits its client state, then crashes before its checkpoint
    store.commit()
    assert len(pt_files(tmp_path)) == 2

    fresh = ClientStateStore(tmp_path)
    fresh.load_state_dict(checkpoint_at_1)
    assert fresh.version("a") == 1
    assert same(fresh.get("a"), arrays(1))
    assert pt_files(tmp_path) == [n for n in pt_files(tmp_path) if n.endswith("-1.pt")]
    assert len(pt_files(tmp_path)) == 1


def test_load_state_dict_discards_dirty_entries_and_deletes_unknown_clients(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put("a", arrays(1), 1)
    store.commit()
    checkpoint = store.state_dict()
    store.put("b", arrays(2), 2)
    store.commit()
    store.put("a", arrays(3), 2)  # dirty, never committed
    store.load_state_dict(checkpoint)
    assert store.client_ids() == ["a"] and store.cached_count == 0
    assert same(store.get("a"), arrays(1))
    assert len(pt_files(tmp_path)) == 1


def test_load_state_dict_with_a_missing_file_raises(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put("a", arrays(1), 1)
    store.commit()
    checkpoint = store.state_dict()
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ClientStateStore(tmp_path).load_state_dict(checkpoint)


def test_prune_deletes_older_versions_only(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for v in (1, 2, 3):
        store.put("a", arrays(v), v)
        store.commit()
    store.put("b", arrays(9), 1)  # a client not sampled since round 1 keeps its only file
    store.commit()
    (tmp_path / "notes.txt").write_text("not ours")
    assert len(pt_files(tmp_path)) == 4
    store.prune()
    names = pt_files(tmp_path)
    assert len(names) == 2 and sum(n.endswith("-3.pt") for n in names) == 1 and sum(n.endswith("-1.pt") for n in names)
    assert (tmp_path / "notes.txt").exists()
    fresh = ClientStateStore(tmp_path, max_cached=0)
    fresh.load_state_dict(store.state_dict())
    assert same(fresh.get("a"), arrays(3)) and same(fresh.get("b"), arrays(9))


def test_memory_stays_flat_with_many_clients(tmp_path: Path) -> None:
    n_clients, batch, max_cached = 2000, 100, 16
    store = ClientStateStore(tmp_path, max_cached=max_cached)

    def tensor(i: int) -> torch.Tensor:
        return torch.full((10_000,), float(i)) + torch.arange(10_000, dtype=torch.float32)

    buf = torch.empty(10_000)
    for start in range(0, n_clients, batch):
        for i in range(start, start + batch):
            buf.copy_(tensor(i))  # one reused caller buffer
            store.put(f"client-{i}", {"x": buf}, start // batch)
            assert store.cached_count <= max_cached + batch
        store.commit()
        assert store.cached_count <= max_cached
    assert len(store) == n_clients
    for i in range(0, n_clients, n_clients // 50):
        assert torch.equal(store.get(f"client-{i}")["x"], tensor(i))
        assert store.cached_count <= max_cached


def test_open_latest_finds_newest_version_per_client_and_removes_tmp_leftovers(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for v in (1, 2):
        store.put("a", arrays(v), v)
        store.commit()
    store.put("b", arrays(7), 1)
    store.commit()
    a_file = next(n for n in pt_files(tmp_path) if n.endswith("-2.pt"))
    leftover = tmp_path / f"{a_file[:32]}-3.pt.x1y2.tmp"  # an interrupted commit of round 3
    leftover.write_bytes(b"half written")

    reopened = ClientStateStore.open_latest(tmp_path)
    assert not leftover.exists()
    assert reopened.client_ids() == ["a", "b"]
    assert reopened.version("a") == 2 and reopened.version("b") == 1
    assert same(reopened.get("a"), arrays(2)) and same(reopened.get("b"), arrays(7))
    reopened.put("a", arrays(3), 3)
    reopened.commit()
    reopened.prune()
    assert len(pt_files(tmp_path)) == 2


def test_hostile_client_ids_stay_inside_the_directory(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    store = ClientStateStore(folder)
    with pytest.raises(InvalidUpdateError):
        store.put("", arrays(0), 1)
    ids = ["../../etc/passwd", "a/b", "é x", ".."]
    for i, cid in enumerate(ids):
        store.put(cid, arrays(i), 1)
    store.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert all(p.parent == folder and p.is_file() for p in folder.iterdir())
    assert len(pt_files(folder)) == len(ids)
    reopened = ClientStateStore.open_latest(folder)
    assert reopened.client_ids() == sorted(ids)
    for i, cid in enumerate(ids):
        assert same(reopened.get(cid), arrays(i))


@pytest.mark.parametrize(
    "args",
    [(None, {"x": torch.ones(1)}, 1), ("a", {"x": torch.ones(1)}, -1), ("a", {"x": torch.ones(1)}, True),
     ("a", {"x": torch.ones(1)}, 1.0), ("a", [torch.ones(1)], 1), ("a", {"x": [1.0]}, 1), ("a", {1: torch.ones(1)}, 1)],
)
def test_invalid_puts_are_refused(args: tuple) -> None:
    with pytest.raises(InvalidUpdateError):
        ClientStateStore().put(*args)


def test_damaged_file_raises_checkpoint_error(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path, max_cached=0)
    store.put("victim", arrays(0), 4)
    store.commit()
    (path,) = list(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="victim") as info:
        store.get("victim")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        ClientStateStore.open_latest(tmp_path)


def test_damaged_checkpoint_state_raises_checkpoint_error() -> None:
    with pytest.raises(CheckpointError):
        ClientStateStore().load_state_dict({"clients": {"a": 1}})


def test_checkpoints_load_across_spilling_and_in_memory_stores(tmp_path: Path) -> None:
    memory = ClientStateStore()
    memory.put("a", arrays(1), 5)
    disk = ClientStateStore(tmp_path / "s")
    disk.load_state_dict(reload(memory.state_dict()))
    assert disk.cached_count == 1 and same(disk.get("a"), arrays(1))
    disk.commit()
    back = ClientStateStore()
    back.load_state_dict(reload(disk.state_dict()))
    assert back.version("a") == 5 and same(back.get("a"), arrays(1))


def test_get_returns_a_new_dict_each_time(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put("a", arrays(0), 1)
    store.get("a").pop("c")
    store.commit()
    store.get("a").clear()
    assert same(store.get("a"), arrays(0))


# -- older checkpoints, rollback, privacy counters, full disk ------------------------------------


def test_prune_keeps_the_versions_older_checkpoints_name(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    indexes = []
    for version in (1, 2, 3, 4):
        store.put("a", arrays(version), version)
        if version % 2:
            store.put("b", arrays(10 + version), version)
        store.commit()
        indexes.append(store.index())
        store.prune(indexes[-3:])  # a server keeping its last three checkpoints
    assert indexes[-3:] == [{"a": 2, "b": 1}, {"a": 3, "b": 3}, {"a": 4, "b": 3}]
    on_disk = {(n.split("-")[0], int(n.split("-")[1][:-3])) for n in pt_files(tmp_path)}
    versions = {}
    for digest, version in on_disk:
        versions.setdefault(digest, set()).add(version)
    assert sorted(versions.values(), key=len) == [{1, 3}, {2, 3, 4}]  # b: 1 and 3; a: 2, 3 and 4 (a's 1 went)
    store.prune()
    assert len(pt_files(tmp_path)) == 2  # only the committed versions


def test_prune_latest_keeps_a_clients_newest_versions(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for version in range(1, 7):
        store.put("a", arrays(version), version)
        store.commit()
        store.prune(latest=4)
    assert [int(n.split("-")[1][:-3]) for n in pt_files(tmp_path)] == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="latest"):
        store.prune(latest=0)


def test_loading_an_older_checkpoint_rolls_back_but_keeps_privacy_counters(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put("a", {**arrays(1), "dpsgd_steps": torch.tensor(10)}, 1)
    store.commit()
    older = reload(store.state_dict())
    store.put("a", {**arrays(2), "dpsgd_steps": torch.tensor(20)}, 2)
    store.commit()
    store.put("a", {**arrays(3), "dpsgd_steps": torch.tensor(30)}, 3)
    store.commit()

    resumed = ClientStateStore(tmp_path)
    resumed.load_state_dict(older)  # the server fell back to round 1's checkpoint
    got = resumed.get("a")
    assert same({k: v for k, v in got.items() if k != "dpsgd_steps"}, arrays(1))  # training state: round 1's
    assert int(got["dpsgd_steps"]) == 30  # privacy spent: never rolled back
    resumed.commit()
    assert pt_files(tmp_path) == [pt_files(tmp_path)[0]] and pt_files(tmp_path)[0].endswith("-1.pt")
    assert int(ClientStateStore.open_latest(tmp_path).get("a")["dpsgd_steps"]) == 30


def test_get_before_a_round_gives_the_state_that_round_was_trained_from(tmp_path: Path) -> None:
    """A deployed client whose server went back to an older checkpoint trains the replayed round from the right
    state, with its privacy counters kept."""
    store = ClientStateStore(tmp_path)
    for version in (2, 4, 6):
        store.put("a", {**arrays(version), "dpsgd_steps": torch.tensor(version * 10)}, version)
        store.commit()
        store.prune(latest=4)
    restarted = ClientStateStore.open_latest(tmp_path)
    assert same(restarted.get("a", before=7), {**arrays(6), "dpsgd_steps": torch.tensor(60)})
    replay = restarted.get("a", before=5)  # the server resumed at round 4 and asks for round 5
    assert same({k: v for k, v in replay.items() if k != "dpsgd_steps"}, arrays(4))
    assert int(replay["dpsgd_steps"]) == 60
    assert restarted.get("a", before=2) == {"dpsgd_steps": torch.tensor(60)}  # nothing older: fresh state
    assert same(ClientStateStore().get("x", before=1), {})


def test_a_full_disk_while_committing_is_one_line_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    from fedlearn.server import checkpoint

    store = ClientStateStore(tmp_path)
    store.put("a", arrays(1), 1)
    store.commit()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    store.put("a", arrays(2), 2)
    with pytest.raises(CheckpointError, match="ENOSPC.*free disk space") as error:
        store.commit()
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    assert len(pt_files(tmp_path)) == 1 and not list(tmp_path.glob("*.tmp"))
    assert same(ClientStateStore.open_latest(tmp_path).get("a"), arrays(1))
