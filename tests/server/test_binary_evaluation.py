"""Binary-task metrics through central and federated evaluation: exact where exact, absent for 10 classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalResult
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.evaluation import CentralEvaluator
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg

torch.set_num_threads(1)

BINARY_ROW_KEYS = {"test_auc", "test_sensitivity", "test_specificity", "test_balanced_accuracy"}
FED_ROW_KEYS = {"fed_auc", "fed_auc_max_error", "fed_sensitivity", "fed_specificity", "fed_balanced_accuracy"}


def linear(classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


def data(n: int, seed: int, classes: int = 2, positive_rate: float = 0.3) -> ArrayDataset:
    """Labels with a class-dependent shift in the inputs, so a linear model scores better than chance."""
    g = torch.Generator().manual_seed(seed)
    if classes == 2:
        y = (torch.rand(n, generator=g) < positive_rate).long()
    else:
        y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) + 0.8 * y.float().view(-1, 1, 1, 1)
    return ArrayDataset(x, y)


def build(classes: int, *, central: bool, federated: bool) -> tuple[RoundLoop, ArrayDataset]:
    """Three clients with different sizes and prevalences; the central test set is their test sets pooled."""
    torch.manual_seed(0)
    model = linear(classes)
    tests = [data(30, 10, classes, 0.9), data(55, 11, classes, 0.2), data(17, 12, classes, 0.5)]
    clients = {f"site-{i}": ClientData(data(40, i, classes), test) for i, test in enumerate(tests)}
    pooled = ArrayDataset(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]))
    trainer = LocalTrainer(model, device="cpu")
    evaluator = CentralEvaluator(linear(classes), pooled, device="cpu", batch_size=16) if central else None
    loop = RoundLoop(FedAvg(local=LocalConfig(batch_size=8, lr=0.1)), InProcessRuntime(ClientApp(trainer, clients)),
                     trainer.vector.spec, trainer.vector.read(), evaluator=evaluator, federated_eval=federated)
    return loop, pooled


def test_central_score_is_exact_against_sklearn() -> None:
    torch.manual_seed(3)
    model = linear(2)
    test = data(200, 4)
    with torch.no_grad():
        logits = model(test.x)
    margins = (logits[:, 1] - logits[:, 0]).numpy()
    predictions = logits.argmax(dim=1).numpy()
    labels = test.y.numpy()
    evaluator = CentralEvaluator(linear(2), test, device="cpu", batch_size=64)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    scores = evaluator.score(weights)
    assert scores["auc"] == pytest.approx(roc_auc_score(labels, margins), abs=1e-12)
    assert scores["sensitivity"] == recall_score(labels, predictions)
    assert scores["specificity"] == recall_score(labels, predictions, pos_label=0)
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions), abs=1e-15)
    assert scores["accuracy"] == float(np.mean(predictions == labels))
    # loss is the mean cross-entropy (summed over batches of 64, so equal up to float32 rounding)
    assert scores["loss"] == pytest.approx(F.cross_entropy(logits, test.y).item(), rel=1e-6)
    assert evaluator.score(weights) == scores  # scoring is deterministic and keeps no state


def test_central_score_of_a_ten_class_model_has_no_binary_fields() -> None:
    evaluator = CentralEvaluator(linear(10), data(50, 5, classes=10), device="cpu")
    assert set(evaluator.score(evaluator.vector.read())) == {"loss", "accuracy"}


def test_federated_counts_pool_exactly_to_the_central_metrics_of_the_same_images() -> None:
    loop, _ = build(2, central=True, federated=True)
    row = loop.run_round()
    assert BINARY_ROW_KEYS <= row.keys() and FED_ROW_KEYS <= row.keys()
    # The central test set is the clients' test sets pooled: summed counts must give identical rates.
    assert row["fed_sensitivity"] == row["test_sensitivity"]
    assert row["fed_specificity"] == row["test_specificity"]
    assert row["fed_balanced_accuracy"] == row["test_balanced_accuracy"]
    assert row["fed_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-12)
    assert abs(row["fed_auc"] - row["test_auc"]) <= row["fed_auc_max_error"]


def test_federated_only_evaluation_reports_the_pooled_metrics_as_test_fields() -> None:
    loop, pooled = build(2, central=False, federated=True)
    row = loop.run_round()
    assert all(row[f"test_{k}"] == row[f"fed_{k}"] for k in ("auc", "sensitivity", "specificity",
                                                             "balanced_accuracy"))
    central = CentralEvaluator(linear(2), pooled, device="cpu").score(loop.weights)
    assert row["fed_sensitivity"] == central["sensitivity"]


def test_ten_class_rows_have_no_binary_fields() -> None:
    loop, _ = build(10, central=True, federated=True)
    row = loop.run_round()
    assert not (BINARY_ROW_KEYS | FED_ROW_KEYS) & row.keys()
    assert row["test_accuracy"] is not None and row["fed_accuracy"] is not None


def test_aggregate_evaluate_sums_confusion_counts() -> None:
    results = [
        EvalResult(1, "a", 10, {"loss": 0.5, "accuracy": 0.8, "tp": 6.0, "fp": 1.0, "tn": 2.0, "fn": 1.0,
                                "pos_bin_200": 7.0, "neg_bin_100": 3.0}),
        EvalResult(1, "b", 4, {"loss": 1.0, "accuracy": 0.5, "tp": 0.0, "fp": 2.0, "tn": 2.0, "fn": 0.0,
                               "neg_bin_200": 4.0}),
        EvalResult(1, "no-test-data", 0, {}),  # a client without test data is left out of the pooled figures
    ]
    out = FedAvg().aggregate_evaluate(results)
    assert out["num_examples"] == 14
    assert out["accuracy"] == pytest.approx((0.8 * 10 + 0.5 * 4) / 14)
    assert out["loss"] == pytest.approx((0.5 * 10 + 1.0 * 4) / 14)
    assert out["sensitivity"] == 6 / 7 and out["specificity"] == 4 / 7
    assert out["balanced_accuracy"] == (6 / 7 + 4 / 7) / 2
    # positives all in bin 200; negatives: 3 below, 4 tied in bin 200 -> (3 + 0.5 * 4) / 7 per positive
    assert out["auc"] == pytest.approx(5 / 7) and out["auc_max_error"] == pytest.approx(2 / 7)
    only = FedAvg().aggregate_evaluate([EvalResult(1, "c", 3, {"loss": 0.1, "accuracy": 1.0})])
    assert set(only) == {"loss", "accuracy", "num_examples"}
    assert FedAvg().aggregate_evaluate([EvalResult(1, "c", 0, {})]) == {}
