"""`fedlearn run` writes ROC AUC, sensitivity, specificity and balanced accuracy for binary tasks only."""

from __future__ import annotations

import json
from pathlib import Path

from fedlearn.cli import main

FAST = ["run", "--quiet", "--rounds", "1", "--clients", "2", "--local-epochs", "1", "--model", "mcmahan-2nn",
        "--batch-size", "256", "--fraction", "0.5", "--evaluation", "both"]
BINARY = {"test_auc", "test_sensitivity", "test_specificity", "test_balanced_accuracy"}
FEDERATED = {"fed_auc", "fed_auc_max_error", "fed_sensitivity", "fed_specificity", "fed_balanced_accuracy"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pneumoniamnist_rows_carry_binary_metrics(tmp_path: Path, shared_dataset) -> None:
    data_dir = shared_dataset("medmnist")
    run = tmp_path / "pneumonia"
    assert main([*FAST, "--dataset", "pneumoniamnist", "--data-dir", str(data_dir), "--no-download",
                 "--output", str(run)]) == 0
    (row,) = _rows(run)
    assert BINARY <= row.keys() and FEDERATED <= row.keys()
    for key in BINARY | FEDERATED:
        assert 0.0 <= row[key] <= 1.0, key
    assert row["test_balanced_accuracy"] == (row["test_sensitivity"] + row["test_specificity"]) / 2
    # 624 test images, 234 normal: the sensitivity is a whole number of the 390 pneumonia images
    assert abs(row["test_sensitivity"] * 390 - round(row["test_sensitivity"] * 390)) < 1e-9
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_auc"] == row["test_auc"]
    assert summary["final_balanced_accuracy"] == row["test_balanced_accuracy"]


def test_ten_class_rows_have_no_binary_metrics(tmp_path: Path) -> None:
    run = tmp_path / "digits"
    assert main([*FAST, "--dataset", "digits", "--output", str(run)]) == 0
    (row,) = _rows(run)
    assert row["test_accuracy"] is not None and row["fed_accuracy"] is not None
    assert not (BINARY | FEDERATED) & row.keys()
    assert not any(key.startswith("final_auc") for key in json.loads((run / "summary.json").read_text()))
