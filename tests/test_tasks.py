"""Tests for fedlearn.tasks: targets, losses and metrics against hand computation, and exact pooling of sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedlearn.client.batches import iter_batches
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError, DataError, ModelError
from fedlearn.metrics import roc_auc
from fedlearn.tasks import TASKS, Task, TaskScores, add_sums, get_task, loss_from_user

torch.set_num_threads(1)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _scored(task: Task, outputs: torch.Tensor, targets: torch.Tensor, batch: int = 0) -> TaskScores:
    """A task's scores after seeing ``outputs``/``targets`` in batches of ``batch`` (0: one batch)."""
    scores = task.scores()
    size = batch or outputs.shape[0]
    for start in range(0, outputs.shape[0], size):
        scores.update(outputs[start:start + size], targets[start:start + size])
    return scores


# --- registry ------------------------------------------------------------------------------------------------

def test_registry_and_declarations() -> None:
    assert TASKS == ("classification", "multilabel", "regression")
    assert tuple(get_task(name).name for name in TASKS) == TASKS
    assert get_task(" Regression ") is get_task("regression")
    declared = {name: (get_task(name).primary_metric, get_task(name).higher_is_better) for name in TASKS}
    assert declared == {"classification": ("accuracy", True), "multilabel": ("auc", True), "regression": ("mse", False)}
    assert [get_task(name).output_size(14) for name in TASKS] == [14, 14, 14]
    assert [get_task(name).output_unit for name in TASKS] == ["classes", "labels", "output dimensions"]


def test_unknown_task_names_the_flag_and_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        get_task("segmentation")
    message = str(error.value)
    assert "--task" in message and "'segmentation'" in message and "\n" not in message
    assert all(name in message for name in TASKS)


# --- classification ------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 2.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
CLASSES = torch.tensor([0, 2, 0, 1])


def _cross_entropy(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_classification_loss_and_metrics_by_hand() -> None:
    task = get_task("classification")
    expected = [_cross_entropy(row, int(c)) for row, c in zip(LOGITS.tolist(), CLASSES)]
    assert task.loss(LOGITS, CLASSES).item() == pytest.approx(sum(expected) / 4, rel=1e-12)
    scores = _scored(task, LOGITS, CLASSES, batch=3)
    metrics = scores.metrics()
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(sum(expected) / 4, rel=1e-12)
    assert metrics["accuracy"] == 0.5  # rows 0 and 1 right; row 2 argmax 1; row 3 all tied -> argmax 0
    assert scores.sums()["n"] == 4.0 and scores.sums()["correct"] == 2.0


def test_classification_targets_match_iter_batches_default() -> None:
    task = get_task("classification")
    y = torch.tensor([[1], [0], [2]], dtype=torch.uint8)
    assert task.targets(y).dtype == torch.long and task.targets(y).tolist() == [1, 0, 2]
    long = torch.tensor([3, 1])
    assert task.targets(long) is long or task.targets(long).data_ptr() == long.data_ptr()  # no copy


# --- multilabel ----------------------------------------------------------------------------------------------

ML_LOGITS = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 0.25, 3.0], [0.5, -1.0, -0.75], [-0.1, 2.0, 1.0]],
                         dtype=torch.float64)
ML_LABELS = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)


def test_multilabel_loss_accuracy_and_auc_by_hand() -> None:
    task = get_task("multilabel")
    z, y = ML_LOGITS.tolist(), ML_LABELS.tolist()
    bce = [-(t * math.log(_sigmoid(v)) + (1 - t) * math.log(1 - _sigmoid(v)))
           for zr, yr in zip(z, y) for v, t in zip(zr, yr)]
    assert task.loss(ML_LOGITS, task.targets(ML_LABELS)).item() == pytest.approx(sum(bce) / 12, rel=1e-12)
    right = sum((v > 0) == (t == 1) for zr, yr in zip(z, y) for v, t in zip(zr, yr))
    assert right == 8  # wrong: (0,2) logit 0 is "no", (2,0), (3,0), (3,2)
    metrics = _scored(task, ML_LOGITS, ML_LABELS, batch=3).metrics()
    assert set(metrics) == {"loss", "accuracy", "auc"}
    assert metrics["loss"] == pytest.approx(sum(bce) / 12, rel=1e-12)
    assert metrics["accuracy"] == 8 / 12
    # Label 0: positives {1.5, -0.1} vs negatives {-2.0, 0.5}: pairs won 1.5>-2, 1.5>0.5, -0.1>-2 -> 3/4.
    # Label 1: positives {0.25, 2.0} vs negatives {-0.5, -1.0}: 4/4. Label 2: positives {0, 3} vs {-0.75, 1}: 3/4.
    assert metrics["auc"] == pytest.approx((0.75 + 1.0 + 0.75) / 3, abs=1e-15)


def test_multilabel_auc_skips_labels_without_both_classes() -> None:
    task = get_task("multilabel")
    labels = ML_LABELS.clone()
    labels[:, 1] = 1  # label 1 has no negatives: no AUC, left out of the mean
    metrics = _scored(task, ML_LOGITS, labels).metrics()
    assert metrics["auc"] == pytest.approx((0.75 + 0.75) / 2, abs=1e-15)
    pooled = task.scores_type.metrics_from_sums(_scored(task, ML_LOGITS, labels).sums())
    assert pooled["auc"] == pytest.approx(0.75, abs=pooled["auc_max_error"] + 1e-12)
    empty = task.scores().metrics()
    assert empty == {"loss": None, "accuracy": None, "auc": None}


def test_multilabel_targets_are_float_and_must_be_two_dimensional() -> None:
    task = get_task("multilabel")
    assert task.targets(torch.tensor([[1, 0]], dtype=torch.uint8)).dtype == torch.float32
    with pytest.raises(DataError, match="--task classification"):
        task.targets(torch.tensor([1, 0]))
    with pytest.raises(ModelError, match="outputs shape"):
        task.loss(torch.zeros(4, 3), torch.zeros(4, 2))


# --- regression ----------------------------------------------------------------------------------------------

def test_regression_loss_and_metrics_by_hand() -> None:
    task = get_task("regression")
    outputs = torch.tensor([[1.0], [2.5], [-1.0], [4.0]])
    y = torch.tensor([0.0, 3.0, 1.0, 4.0])
    targets = task.targets(y)
    assert targets.shape == (4, 1) and targets.dtype == torch.float32  # like a one-output model
    errors = [1.0, -0.5, -2.0, 0.0]
    mse = sum(e * e for e in errors) / 4
    assert task.loss(outputs, targets).item() == pytest.approx(mse, rel=1e-7)
    assert task.loss(outputs, y).item() == pytest.approx(mse, rel=1e-7)  # (N,) is aligned, not broadcast to (N, N)
    metrics = _scored(task, outputs, targets, batch=3).metrics()
    assert metrics == {"loss": mse, "mse": mse, "mae": 3.5 / 4}
    assert "accuracy" not in metrics and "accuracy" not in task.scores_type.pool([task.scores().sums()])


def test_regression_several_outputs_mean_over_all_values() -> None:
    task = get_task("regression")
    outputs = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    targets = task.targets(torch.tensor([[0.0, 0.0], [2.0, -1.0]]))
    metrics = _scored(task, outputs, targets).metrics()
    assert metrics["mse"] == (1.0 + 9.0) / 4 and metrics["mae"] == (1.0 + 3.0) / 4
    assert task.loss(outputs, targets).item() == pytest.approx(10.0 / 4)
    with pytest.raises(ModelError, match="outputs shape"):
        _scored(task, outputs, torch.zeros(2, 3))


# --- pooling -------------------------------------------------------------------------------------------------

def _halves(task: Task, outputs: torch.Tensor, targets: torch.Tensor, cut: int) -> tuple[dict, dict]:
    whole = _scored(task, outputs, targets, batch=16)
    parts = [_scored(task, outputs[:cut], targets[:cut], batch=7).sums(),
             _scored(task, outputs[cut:], targets[cut:], batch=5).sums()]
    return whole.metrics(), task.scores_type.pool(parts)


def test_pooled_classification_equals_whole() -> None:
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(101, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (101,), generator=g)
    whole, pooled = _halves(get_task("classification"), outputs, targets, cut=37)
    assert pooled["accuracy"] == whole["accuracy"]
    assert pooled["loss"] == pytest.approx(whole["loss"], rel=1e-14)  # float64 sums in another order


def test_pooled_regression_equals_whole_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    task = get_task("regression")
    outputs = torch.randint(-20, 20, (90, 2), generator=g).float()  # whole numbers: every sum is exact
    targets = task.targets(torch.randint(-20, 20, (90, 2), generator=g).float())
    whole, pooled = _halves(task, outputs, targets, cut=41)
    assert pooled == whole
    assert set(pooled) == {"loss", "mse", "mae"}


def test_pooled_multilabel_loss_accuracy_exact_auc_within_bound() -> None:
    g = torch.Generator().manual_seed(2)
    task = get_task("multilabel")
    labels = (torch.rand(400, 6, generator=g) < 0.3).float()
    outputs = (2 * labels - 1) * 0.4 + torch.randn(400, 6, generator=g, dtype=torch.float64)  # informative logits
    whole, pooled = _halves(task, outputs, labels, cut=150)
    assert pooled["accuracy"] == whole["accuracy"]
    assert pooled["loss"] == pytest.approx(whole["loss"], rel=1e-14)
    exact = np.mean([roc_auc(labels[:, j].numpy(), outputs[:, j].numpy()) for j in range(6)])
    assert whole["auc"] == pytest.approx(exact, abs=1e-15)
    assert 0 < pooled["auc_max_error"] < 0.05
    assert abs(pooled["auc"] - exact) <= pooled["auc_max_error"] + 1e-12
    assert 0.6 < pooled["auc"] < 0.9
    # The histograms add exactly: pooling the halves is the same as the whole's own sums.
    full = task.scores_type.metrics_from_sums(_scored(task, outputs, labels).sums())
    assert pooled["auc"] == full["auc"] and pooled["auc_max_error"] == full["auc_max_error"]


def test_pooled_multilabel_auc_exact_when_no_two_scores_share_a_bin() -> None:
    task = get_task("multilabel")
    outputs = torch.tensor([[-3.0], [-1.0], [0.5], [2.0], [4.0]])  # one logit per bin of width 1/8
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0]])
    pooled = task.scores_type.pool([_scored(task, outputs[:2], labels[:2]).sums(),
                                    _scored(task, outputs[2:], labels[2:]).sums()])
    assert pooled["auc_max_error"] == 0.0
    assert pooled["auc"] == roc_auc(labels.numpy(), outputs.numpy()) == 5 / 6


def test_malformed_sums_are_value_errors() -> None:
    scores_type = get_task("classification").scores_type
    with pytest.raises(ValueError, match="lack 'correct'"):
        scores_type.metrics_from_sums({"n": 3.0, "loss_sum": 1.0})
    with pytest.raises(ValueError, match="not a count"):
        scores_type.metrics_from_sums({"n": 3.5, "loss_sum": 1.0, "correct": 1.0})
    with pytest.raises(ValueError, match="not a finite number"):
        add_sums([{"n": float("nan")}])
    assert add_sums([{"n": 1.0, "a": 2.0}, {"n": 2.0, "b": 1.0}]) == {"n": 3.0, "a": 2.0, "b": 1.0}
    assert scores_type.metrics_from_sums({"n": 0.0, "loss_sum": 0.0, "correct": 0.0}) == {"loss": None,
                                                                                        "accuracy": None}


# --- user losses ---------------------------------------------------------------------------------------------

def test_user_loss_is_used_when_given() -> None:
    task = get_task("regression")
    mse = torch.nn.MSELoss()
    assert loss_from_user(mse, task) is mse
    assert loss_from_user(None, task) == task.loss

    calls = []

    def l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(outputs.shape)
        return (outputs - targets).abs().mean()

    chosen = loss_from_user(l1, task)
    outputs, targets = torch.tensor([[1.0], [3.0]]), task.targets(torch.tensor([0.0, 0.0]))
    assert chosen(outputs, targets).item() == 2.0 and calls == [(2, 1)]
    assert mse(outputs, targets).item() == 5.0  # targets already match a one-output model: no broadcasting


@pytest.mark.parametrize("bad", [3, "mse", torch.nn.MSELoss])
def test_non_callable_or_class_loss_is_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="loss") as error:
        loss_from_user(bad, get_task("classification"))
    assert "\n" not in str(error.value)


# --- batches -------------------------------------------------------------------------------------------------

def test_iter_batches_applies_task_targets() -> None:
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    multi = ArrayDataset(x, (torch.arange(30).reshape(10, 3) % 2).to(torch.uint8))
    for dataset in (multi, TensorDataset(multi.x, multi.y)):
        batches = list(iter_batches(dataset, 4, shuffle=False, targets=get_task("multilabel").targets))
        assert [yb.shape for _, yb in batches] == [(4, 3), (4, 3), (2, 3)]
        assert all(yb.dtype == torch.float32 for _, yb in batches)
        assert torch.equal(torch.cat([yb for _, yb in batches]), multi.y.float())

    class Plain(torch.utils.data.Dataset):  # not tensor-backed: goes through a DataLoader
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i], torch.tensor(float(i) / 2)

    batches = list(iter_batches(Plain(), 2, shuffle=False, targets=get_task("regression").targets))
    assert [yb.tolist() for _, yb in batches] == [[[0.0], [0.5]], [[1.0], [1.5]], [[2.0]]]
    default = list(iter_batches(Plain(), 5, shuffle=False))
    assert default[0][1].dtype == torch.long and default[0][1].tolist() == [0, 0, 1, 1, 2]


def test_shuffled_batches_keep_targets_paired() -> None:
    x = torch.arange(9, dtype=torch.float32).reshape(9, 1, 1, 1)
    dataset = ArrayDataset(x, torch.arange(9, dtype=torch.float32) * 10)
    g = torch.Generator().manual_seed(3)
    for xb, yb in iter_batches(dataset, 4, shuffle=True, generator=g, targets=get_task("regression").targets):
        assert torch.equal(yb, xb.reshape(-1, 1) * 10)


def test_linear_regression_trains_on_synthetic_data() -> None:
    from fedlearn.data import load_dataset
    from fedlearn.data.synthetic import NOISE_STD

    bundle = load_dataset("synthetic-regression")
    task = get_task(bundle.task)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, task.output_size(bundle.num_classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = loss_from_user(None, task)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for xb, yb in iter_batches(bundle.train, 32, shuffle=True, generator=g, targets=task.targets):
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    scores = task.scores()
    with torch.no_grad():
        for xb, yb in iter_batches(bundle.test, 64, shuffle=False, targets=task.targets):
            scores.update(model(xb), yb)
    metrics = scores.metrics()
    assert metrics["mse"] < 3 * NOISE_STD ** 2 and metrics["mae"] < 3 * NOISE_STD
    assert scores.sums()["n"] == 200.0


def test_federated_multilabel_auc_is_pooled_from_the_clients_histograms():
    """Federated evaluation pools the clients' sums: loss and accuracy exactly, AUC within its stated bound."""
    from torch import nn

    from fedlearn.client.app import ClientApp
    from fedlearn.client.data import ClientData
    from fedlearn.client.trainer import LocalTrainer, evaluate_model
    from fedlearn.data.arrays import ArrayDataset
    from fedlearn.protocol.params import ModelVector
    from fedlearn.runtime.inprocess import InProcessRuntime
    from fedlearn.server.loop import RoundLoop
    from fedlearn.strategies import build_strategy

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    parts = []
    for size in (40, 25):
        x = torch.randn(size, 6, generator=g)
        y = (x[:, :3] + 0.5 * torch.randn(size, 3, generator=g) > 0).float()
        parts.append(ArrayDataset(x, y))
    clients = {f"c{i}": ClientData(p, p) for i, p in enumerate(parts)}
    app = ClientApp(LocalTrainer(model, "cpu", task="multilabel"), clients)
    vector = ModelVector(model)
    loop = RoundLoop(build_strategy("fedavg"), InProcessRuntime(app), vector.spec, vector.read(),
                     federated_eval=True, reported=("loss", "accuracy", "auc"))
    fed = loop.evaluate_federated(0)
    union = ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    _, exact = evaluate_model(model, union, torch.device("cpu"), task="multilabel", pooled=False)
    assert fed["loss"] == pytest.approx(exact["loss"], rel=1e-12)
    assert fed["accuracy"] == pytest.approx(exact["accuracy"], rel=1e-12)
    assert abs(fed["auc"] - exact["auc"]) <= fed["auc_max_error"] + 1e-12
