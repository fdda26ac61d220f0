"""What crosses the runtime boundary in federated face training: the backbone's vector and nothing private."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, replace

import pytest
import torch

from fedlearn.faces.config import FaceConfig
from fedlearn.faces.experiment import FaceRunSettings, run_method
from fedlearn.faces.model import FaceEmbeddingNet
from fedlearn.faces.split import split_identities
from fedlearn.faces.templates import head_from_state
from fedlearn.protocol.codec import decode, encode
from fedlearn.protocol.messages import EvalResult, EvalTask, Message, TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime

SETTINGS = FaceRunSettings(rounds=2, local_epochs=1, batch_size=8, embedding_dim=16, width=2,
                           face=FaceConfig(augment=True))


class RecordingRuntime:
    """Passes every message through the wire encoding, as a process boundary would, and keeps a copy."""

    def __init__(self, inner: InProcessRuntime) -> None:
        self.inner = inner
        self.sent: list[TrainTask | EvalTask] = []
        self.received: list[TrainResult | EvalResult] = []
        self.wire_down: list[bytes] = []
        self.wire_up: list[bytes] = []

    def _cross(self, message, wire: list[bytes]):
        data = encode(message)
        wire.append(data)
        return decode(data)

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        if any(not isinstance(t, TrainTask) for t in tasks):
            raise AssertionError("this run must not evaluate on clients")
        delivered = [self._cross(t, self.wire_down) for t in tasks]
        self.sent.extend(delivered)
        for answer in self.inner.deliver(delivered):
            answer = self._cross(answer, self.wire_up)
            self.received.append(answer)
            yield answer

    def close(self) -> None:
        self.inner.close()


def _plain(value) -> bool:
    """Only scalars (and dicts of scalars) may ride in a task's config: no vector or tensor. The one list
    allowed is a list of names or settings dicts (the ``uplink`` array names, a ``transforms`` pipeline),
    never a list of numbers, which could smuggle a vector."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(isinstance(v, str) or (isinstance(v, dict) and _plain(v)) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize("method", ["fedavg", "codebook"])
def test_only_backbone_vectors_cross_and_no_head_ever_does(method, synthetic_faces):
    faces = synthetic_faces(12, 4)
    split = split_identities(12, 3, 3, seed=0)
    boxes: list[RecordingRuntime] = []

    def wrap(runtime: InProcessRuntime) -> RecordingRuntime:
        boxes.append(RecordingRuntime(runtime))
        return boxes[0]

    result = run_method(method, faces, split, SETTINGS, seed=0, wrap_runtime=wrap)
    box = boxes[0]
    backbone_size = ParamSpec.from_module(FaceEmbeddingNet(SETTINGS.embedding_dim, SETTINGS.width)).numel
    assert len(box.sent) == len(box.received) == 2 * 3  # two rounds, three parties

    for message in box.sent + box.received:
        # no tensor rides outside the named arrays, and the arrays are exactly the backbone's vector
        assert not [f.name for f in fields(message) if isinstance(getattr(message, f.name), torch.Tensor)]
        tensors = dict(message.arrays)
        if isinstance(message, TrainTask):
            assert list(tensors) == ["weights"]
            assert _plain(message.config) and message.config["uplink"] == ["update"]
        else:
            assert list(tensors) == ["update"]
            assert set(message.metrics) == {"train_loss"} and message.sealed == {}
        (vector,) = tensors.values()
        assert vector.dtype == torch.float32 and vector.shape == (backbone_size,)

    # the heads exist on the client side, and not one of their rows appears in any encoded message
    store = box.inner.app.state
    assert store.client_ids() == ["party-0", "party-1", "party-2"]
    heads = [(cid, head_from_state(store.get(cid), cid, len(split.parties[i]), SETTINGS.embedding_dim,
                                   replace(SETTINGS.face, templates="learned" if method == "fedavg" else "codebook"),
                                   secret=0)) for i, cid in enumerate(store.client_ids())]
    for _, head in heads:
        if method == "fedavg":
            assert head.weight.shape == (len(split.parties[0]), SETTINGS.embedding_dim)
            for row in head.weight:
                needle = row.numpy().tobytes()
                assert not any(needle in data for data in box.wire_down + box.wire_up)
        else:
            assert head.weight is None and head.rows is not None
            for task in box.sent:
                assert "rows" not in task.config["face"]
    # the round loop's byte count is exactly these encoded results: nothing else went up
    assert result["bytes_up"] == sum(len(d) for d in box.wire_up)


def test_codebook_parties_get_disjoint_pools_and_the_same_public_settings(synthetic_faces):
    faces = synthetic_faces(12, 4)
    split = split_identities(12, 3, 3, seed=0)
    boxes: list[RecordingRuntime] = []
    run_method("codebook", faces, split, SETTINGS, seed=0, wrap_runtime=lambda r: boxes.append(RecordingRuntime(r))
               or boxes[0])
    configs = {t.client_id: t.config["face"] for t in boxes[0].sent}
    assert sorted(c["pool"] for c in configs.values()) == [0, 1, 2]
    public = [{k: v for k, v in c.items() if k != "pool"} for c in configs.values()]
    assert all(p == public[0] for p in public)
    assert public[0]["templates"] == "codebook" and public[0]["pools"] == 3
