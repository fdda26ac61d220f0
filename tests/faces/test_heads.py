"""Private heads, the public codebook, CosFace and the face strategies."""

from __future__ import annotations

import math

import pytest
import torch

from fedlearn.client.data import ClientData
from fedlearn.errors import ConfigError, DataError
from fedlearn.faces.config import FaceConfig
from fedlearn.faces.margin import margin_cross_entropy
from fedlearn.faces.model import FaceEmbeddingNet
from fedlearn.faces.split import local_dataset
from fedlearn.faces.strategy import CodebookFedAvg, PrivateHeadFedAvg
from fedlearn.faces.templates import head_from_state, head_state, pool_rows, public_codebook
from fedlearn.faces.trainer import PrivateHeadTrainer
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalTask, TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.strategies.base import ServerState


def test_cosface_loss_matches_the_formula():
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    templates = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, 0])
    s, m = 2.0, 0.5
    # photo 0: logits (2 * (1 - 0.5), 0) -> log(1 + e^-1); photo 1: logits (2 * (0 - 0.5), 2) -> log(1 + e^3)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 2
    assert margin_cross_entropy(embeddings, templates, targets, s, m).item() == pytest.approx(expected, rel=1e-6)


def test_public_codebook_is_orthonormal_and_reproducible():
    book = public_codebook(20, 32, seed=4)
    assert book.shape == (20, 32)
    assert torch.allclose(book @ book.T, torch.eye(20), atol=1e-5)
    assert torch.equal(book, public_codebook(20, 32, seed=4))
    assert not torch.allclose(book, public_codebook(20, 32, seed=5))
    with pytest.raises(ConfigError, match="embedding dimension"):
        public_codebook(33, 32, seed=0)


def test_codebook_heads_draw_distinct_rows_from_their_own_pool_only():
    rows, states = {}, {}
    for pool in range(3):
        face = FaceConfig(templates="codebook", pool=pool, pools=3)
        head = head_from_state({}, f"party-{pool}", 8, 30, face, secret=3)
        states[pool] = head_state(head)
        rows[pool] = set(head.rows.tolist())
        assert len(rows[pool]) == 8 and rows[pool] <= set(pool_rows(30, pool, 3).tolist())
        again = head_from_state(states[pool], f"party-{pool}", 8, 30, face, secret=99)
        assert torch.equal(again.rows, head.rows)  # a stored head is reused, whatever the secret
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])
    with pytest.raises(ConfigError, match="pool has 10 rows"):
        head_from_state({}, "party-9", 11, 30, FaceConfig(templates="codebook", pool=0, pools=3), secret=3)
    with pytest.raises(ConfigError, match="keep the template mode"):
        head_from_state(states[0], "party-0", 8, 30, FaceConfig(templates="learned"), secret=3)


def _task(round_: int, cid: str, weights: torch.Tensor, face: FaceConfig, hooks=None, **local) -> TrainTask:
    config = LocalConfig(local_epochs=1, batch_size=8, lr=0.05, momentum=0.9, seed=round_, **local).to_dict()
    if hooks:
        config["hooks"] = hooks
    return TrainTask(round_, cid, {"weights": weights}, {**config, "face": face.to_dict()})


@pytest.mark.parametrize("templates", ["learned", "codebook"])
def test_trainer_returns_a_backbone_update_and_keeps_the_head(templates, synthetic_faces):
    faces = synthetic_faces(4, 6, size=32)
    own = local_dataset(faces, (0, 1, 2, 3))
    data = ClientData(train=own, test=own)
    backbone = FaceEmbeddingNet(embedding_dim=8, width=2, image_size=32)
    trainer = PrivateHeadTrainer(backbone, device="cpu", secret=1)
    weights = ModelVector(backbone).read()
    face = FaceConfig(templates=templates)
    first = trainer.fit(_task(1, "party-0", weights, face), data)
    assert list(first.arrays) == ["update"]  # only the backbone's update; the head stays here
    update = first.arrays["update"]
    assert update.shape == weights.shape and first.num_examples == 24
    assert update.abs().sum() > 0
    assert all(k.startswith("personal/head.") for k in first.state)  # the head is the client's own state
    before = head_from_state(first.state, "party-0", 4, 8, face, secret=1)
    second = trainer.fit(_task(2, "party-0", weights + update, face), data, state=first.state)
    head = head_from_state(second.state, "party-0", 4, 8, face, secret=1)
    if templates == "learned":
        assert head.weight.shape == (4, 8) and not torch.equal(head.weight, before.weight)  # trained, kept, reused
    else:
        assert head.weight is None and head.rows.shape == (4,) and torch.equal(head.rows, before.rows)
    n, metrics = trainer.evaluate(EvalTask(2, "party-0", {"weights": weights}, {"face": face.to_dict()}), data,
                                  second.state)
    assert n == 24 and 0.0 <= metrics["accuracy"] <= 1.0


def test_trainer_learns_its_people(synthetic_faces):
    """Property, fixed seed: twenty local epochs separate four synthetic people almost perfectly."""
    faces = synthetic_faces(4, 6, size=32)
    own = local_dataset(faces, (0, 1, 2, 3))
    data = ClientData(train=own, test=own)
    torch.manual_seed(0)
    backbone = FaceEmbeddingNet(embedding_dim=8, width=2, image_size=32)
    trainer = PrivateHeadTrainer(backbone, device="cpu")
    face = FaceConfig(templates="codebook", augment=False)
    weights = ModelVector(backbone).read()
    config = LocalConfig(local_epochs=20, batch_size=8, lr=0.05, momentum=0.9).to_dict()
    result = trainer.fit(TrainTask(1, "p", {"weights": weights}, {**config, "face": face.to_dict()}), data)
    _, score = trainer.evaluate(EvalTask(1, "p", {"weights": weights + result.arrays["update"]},
                                         {"face": face.to_dict()}), data, result.state)
    assert score["accuracy"] >= 0.9


def test_trainer_refuses_what_it_cannot_do(synthetic_faces):
    faces = synthetic_faces(3, 2, size=16)
    backbone = FaceEmbeddingNet(embedding_dim=4, width=1, image_size=16)
    trainer = PrivateHeadTrainer(backbone, device="cpu")
    weights = ModelVector(backbone).read()
    data = ClientData(train=local_dataset(faces, (0, 1, 2)))
    with pytest.raises(ConfigError, match="delta"):
        trainer.fit(_task(1, "p", weights, FaceConfig(), mode="gradient"), data)
    with pytest.raises(ConfigError, match="prox hook only"):  # DP-SGD's per-example clipping is not supported
        trainer.fit(_task(1, "p", weights, FaceConfig(), hooks={"dpsgd": {"clip_norm": 1.0, "noise_multiplier": 1.0}}),
                    data)
    skipped = ClientData(train=local_dataset(faces, (0, 2)))
    skipped.train.y[skipped.train.y == 1] = 2
    with pytest.raises(DataError, match="none skipped"):
        trainer.fit(_task(1, "p", weights, FaceConfig()), skipped)
    with pytest.raises(ConfigError, match="unknown face setting"):
        FaceConfig.from_dict({"templates": "learned", "rows": [1, 2]})


def test_strategies_send_public_settings_and_keep_no_tensor_state():
    server = ServerState(torch.zeros(5))
    base = PrivateHeadFedAvg(LocalConfig(), FaceConfig(scale=10.0))
    (task,) = base.configure_train(1, server, ["a"], seed=0)
    assert task.config["face"]["templates"] == "learned" and task.config["face"]["scale"] == 10.0
    book = CodebookFedAvg(LocalConfig(), FaceConfig(), pools=2)
    tasks = book.configure_train(1, server, ["a", "b"], seed=0)
    assert [t.config["face"]["pool"] for t in tasks] == [0, 1]
    assert [t.config["face"]["pool"] for t in book.configure_train(2, server, ["b", "a"], seed=0)] == [1, 0]
    with pytest.raises(ConfigError, match="pools are taken"):
        book.configure_train(3, server, ["c"], seed=0)
    state = book.state_dict()
    assert not any(isinstance(v, torch.Tensor) for v in state.values())
    fresh = CodebookFedAvg(LocalConfig(), FaceConfig(), pools=2)
    fresh.load_state_dict(state)
    assert fresh.pool_of == {"a": 0, "b": 1}
    evals = fresh.configure_evaluate(3, server, ["b"])
    assert evals[0].config["face"]["pool"] == 1
