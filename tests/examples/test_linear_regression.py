"""Seed 003's FedSGD linear regression: one round is w - alpha * mean of the devices' closed-form gradients."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "linear_regression_fedsgd.py"


def _example():
    spec = importlib.util.spec_from_file_location("linear_regression_fedsgd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_form_step(w: torch.Tensor, b: torch.Tensor, sets, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w - alpha * (1/N) sum_i grad_i with grad_i of device i's mean squared error, written out by hand."""
    gw, gb = torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)
    for s in sets:
        x, y = s.x.double(), s.y.double()
        residual = x @ w.double().reshape(-1) + b.double() - y  # (n,)
        gw = gw.reshape(-1) + 2 * (x.T @ residual) / len(y)
        gb += 2 * residual.mean()
    n = len(sets)
    return (w.double().reshape(-1) - alpha * gw / n).reshape(-1), b.double() - alpha * gb / n


def test_each_fedsgd_round_is_the_seed_formula():
    ex = _example()
    alpha = 0.1
    server = ex.build_server(alpha)
    sets, _ = ex.make_devices()
    for _ in range(3):
        model = server.model
        w, b = model.weight.detach().clone(), model.bias.detach().clone()
        expected_w, expected_b = _closed_form_step(w, b, sets, alpha)
        server.train(num_epochs=1, lr=alpha)
        model = server.model
        torch.testing.assert_close(model.weight.detach().double().reshape(-1), expected_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.bias.detach().double(), expected_b, rtol=0, atol=1e-6)


def test_it_recovers_the_true_line():
    ex = _example()
    server = ex.build_server(0.1)
    for _ in range(150):
        server.train(num_epochs=1, lr=0.1)
    model = server.model
    learned = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    _, true = ex.make_devices()
    assert torch.allclose(learned, true, atol=0.02)
