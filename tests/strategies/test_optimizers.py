"""Server optimizers: each matches its paper's formulas written out by hand, checkpoints bit for bit, and
validates its settings through the registry."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import fedlearn.registry as registry
import fedlearn.strategies.optimizers as opt
from fedlearn.errors import CheckpointError, ConfigError, InvalidUpdateError

N = 257
NAMES = ("sgd", "momentum", "adagrad", "adam", "yogi")
# non-default settings, so a formula that ignored one would show
SETTINGS = {
    "sgd": {"server_lr": 0.7},
    "momentum": {"server_lr": 0.8, "server_momentum": 0.6},
    "adagrad": {"server_lr": 0.05, "server_beta1": 0.8, "server_tau": 0.01},
    "adam": {"server_lr": 0.05, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 0.01},
    "yogi": {"server_lr": 0.05, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 0.01},
}


@pytest.fixture(autouse=True)
def only_this_module(monkeypatch):
    """Registry look-ups without importing all of fedlearn.strategies (the optimizers registered on import above)."""
    monkeypatch.setattr(registry, "_load_builtin", lambda: None)


def vectors(seed: int, steps: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Float32 weights and ``steps`` updates of mixed scales (some coordinates tiny, some large)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, generator=g)
    scale = torch.logspace(-4, 0, N)[torch.randperm(N, generator=g)]
    return w, [torch.randn(N, generator=g) * scale for _ in range(steps)]


def make(name: str, values: dict | None = None) -> opt.ServerOptimizer:
    return registry.build("optimizer", name, SETTINGS[name] if values is None else values)


def by_hand(name: str, s: dict, w0: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    """The weights after each step, by the papers' formulas, one coordinate at a time in float64."""
    w = w0.astype(np.float64).tolist()
    n = len(w)
    m = [0.0] * n
    v = [s.get("server_tau", 0.0) ** 2] * n  # Reddi et al.: v_{-1} = tau^2
    out = []
    for delta in deltas:
        d = delta.astype(np.float64).tolist()
        new = np.empty(n)
        for i in range(n):
            if name == "sgd":
                new[i] = w[i] + s["server_lr"] * d[i]
            elif name == "momentum":
                m[i] = s["server_momentum"] * m[i] + d[i]
                new[i] = w[i] + s["server_lr"] * m[i]
            else:
                b1, tau = s["server_beta1"], s["server_tau"]
                m[i] = b1 * m[i] + (1 - b1) * d[i]
                sq = d[i] * d[i]
                if name == "adagrad":
                    v[i] = v[i] + sq
                elif name == "adam":
                    b2 = s["server_beta2"]
                    v[i] = b2 * v[i] + (1 - b2) * sq
                else:  # yogi
                    b2 = s["server_beta2"]
                    sign = int(v[i] > sq) - int(v[i] < sq)
                    v[i] = v[i] - (1 - b2) * sq * sign
                new[i] = w[i] + s["server_lr"] * m[i] / (math.sqrt(v[i]) + tau)
        # the optimizer returns float32 weights and continues from them
        w = new.astype(np.float32).astype(np.float64).tolist()
        out.append(new)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_three_steps_match_the_formulas(name):
    w, deltas = vectors(1)
    o = make(name)
    expected = by_hand(name, SETTINGS[name], w.numpy(), [d.numpy() for d in deltas])
    for d, want in zip(deltas, expected):
        w = o.step(w, d)
        assert w.dtype == torch.float32 and w.shape == (N,)
        np.testing.assert_allclose(w.numpy().astype(np.float64), want, rtol=1e-6, atol=1e-6)
    assert o.steps == 3


def test_adaptive_first_step_by_hand_on_one_coordinate():
    """A scalar worked example: FedAdam's first step with delta = 2, defaults lr .01, b1 .9, b2 .99, tau 1e-3."""
    o = make("adam", {})
    new = o.step(torch.tensor([1.0]), torch.tensor([2.0]))
    m = 0.1 * 2.0
    v = 0.99 * 1e-6 + 0.01 * 4.0
    assert new.item() == pytest.approx(1.0 + 0.01 * m / (math.sqrt(v) + 1e-3), rel=1e-7)


def test_sgd_lr_one_is_fedavg_bitwise():
    w, deltas = vectors(2, steps=1)
    new = make("sgd", {}).step(w, deltas[0])
    assert torch.equal(new, w + deltas[0])


def test_momentum_zero_is_sgd_bitwise():
    w, deltas = vectors(3)
    sgd, mom = make("sgd", {"server_lr": 0.3}), make("momentum", {"server_lr": 0.3, "server_momentum": 0.0})
    a = b = w
    for d in deltas:
        a, b = sgd.step(a, d), mom.step(b, d)
        assert torch.equal(a, b)


def test_momentum_accumulates():
    """Momentum carries past updates: a zero update still moves the weights by lr * momentum * m."""
    o = make("momentum", {"server_lr": 1.0, "server_momentum": 0.5})
    w = o.step(torch.zeros(2), torch.tensor([1.0, -2.0]))
    w = o.step(w, torch.zeros(2))
    assert w.tolist() == [1.5, -3.0]


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip_continues_bitwise(name):
    w, deltas = vectors(4, steps=4)
    straight = make(name)
    w1 = straight.step(w, deltas[0])
    state = roundtrip(straight.state_dict())
    a = straight.step(straight.step(w1, deltas[1]), deltas[2])

    resumed = make(name)
    resumed.load_state_dict(state)
    assert resumed.steps == 1
    b = resumed.step(resumed.step(w1, deltas[1]), deltas[2])
    assert torch.equal(a, b)
    assert torch.equal(straight.step(a, deltas[3]), resumed.step(b, deltas[3]))


@pytest.mark.parametrize("name", NAMES)
def test_state_is_lazy_and_serialisable_before_the_first_step(name):
    o = make(name)
    state = roundtrip(o.state_dict())
    assert state["optimizer"] == name and state["steps"] == 0
    assert all(state[k] is None for k in o.moments)
    fresh = make(name)
    fresh.load_state_dict(state)
    w, deltas = vectors(5, steps=1)
    assert torch.equal(fresh.step(w, deltas[0]), make(name).step(w, deltas[0]))


def test_state_dict_is_a_copy():
    o = make("adam")
    w, deltas = vectors(6, steps=2)
    o.step(w, deltas[0])
    state = o.state_dict()
    m = state["m"].clone()
    o.step(w, deltas[1])
    assert torch.equal(state["m"], m)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_not_modified(name):
    w, deltas = vectors(7)
    o = make(name)
    for d in deltas:
        w_before, d_before = w.clone(), d.clone()
        new = o.step(w, d)
        assert torch.equal(w, w_before) and torch.equal(d, d_before)
        assert new.data_ptr() not in (w.data_ptr(), d.data_ptr())
        w = new


def test_update_of_another_size_is_refused():
    o = make("yogi")
    o.step(torch.zeros(4), torch.ones(4))
    with pytest.raises(InvalidUpdateError, match="has 4 values but the update has 5"):
        o.step(torch.zeros(5), torch.ones(5))
    with pytest.raises(InvalidUpdateError, match="the update has 3 values but the model has 4"):
        o.step(torch.zeros(4), torch.ones(3))
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        o.step(torch.zeros(4), torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    assert o.steps == 1  # refused updates leave the state alone


def test_loaded_state_of_another_size_is_refused_at_step():
    a = make("adam")
    a.step(torch.zeros(3), torch.ones(3))
    b = make("adam")
    b.load_state_dict(roundtrip(a.state_dict()))
    with pytest.raises(InvalidUpdateError, match="has 3 values but the update has 8"):
        b.step(torch.zeros(8), torch.ones(8))


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("v"),
        lambda s: s.update(extra=1),
        lambda s: s.update(optimizer="yogi"),
        lambda s: s.update(steps="1"),
        lambda s: s.update(m=[0.0, 0.0]),
        lambda s: s.update(m=torch.zeros(2, 2)),
        lambda s: s.update(v=torch.zeros(5, dtype=torch.float64)),
        lambda s: s.update(v=None),
        lambda s: s.update(m=torch.full((3,), float("inf"), dtype=torch.float64)),
        lambda s: s.update(steps=0),
    ],
)
def test_malformed_state_is_a_checkpoint_error(change):
    o = make("adam")
    o.step(torch.zeros(3), torch.ones(3))
    state = o.state_dict()
    change(state)
    with pytest.raises(CheckpointError):
        make("adam").load_state_dict(state)
    with pytest.raises(CheckpointError):
        make("adam").load_state_dict([state])


def test_registry_builds_with_flags():
    o = registry.build("optimizer", "adam", {"server_lr": 0.1})
    assert isinstance(o, opt.FedAdam) and o.config.lr == 0.1 and o.config.beta2 == 0.99
    assert registry.build("optimizer", "sgd").config.lr == 1.0
    assert registry.build("optimizer", "adagrad").config.lr == 0.01
    for name, cls in zip(NAMES, (opt.ServerSGD, opt.FedAvgM, opt.FedAdagrad, opt.FedAdam, opt.FedYogi)):
        assert registry.lookup("optimizer", name) is cls


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("adam", {"server_lr": -1}, "--server-lr"),
        ("sgd", {"server_lr": 0}, "--server-lr"),
        ("adam", {"server_lr": float("nan")}, "--server-lr"),
        ("yogi", {"server_lr": float("inf")}, "--server-lr"),
        ("momentum", {"server_momentum": 1.0}, "--server-momentum"),
        ("momentum", {"server_momentum": -0.1}, "--server-momentum"),
        ("adagrad", {"server_beta1": 1.0}, "--server-beta1"),
        ("adam", {"server_beta2": 1.0}, "--server-beta2"),
        ("yogi", {"server_beta2": 0.0}, "--server-beta2"),
        ("adam", {"server_tau": 0.0}, "--server-tau"),
        ("adam", {"server_tau": "small"}, "--server-tau"),
    ],
)
def test_bad_settings_are_config_errors(name, values, message):
    with pytest.raises(ConfigError, match=message):
        registry.build("optimizer", name, values)


def test_edge_settings_are_allowed():
    assert registry.build("optimizer", "momentum", {"server_momentum": 0.0}).config.momentum == 0.0
    assert registry.build("optimizer", "adam", {"server_beta1": 0}).config.beta1 == 0.0


def test_shared_fields_share_types_and_have_help():
    """The registry merges same-named fields into one flag, so their types must agree; every field explains itself."""
    import dataclasses
    import typing

    seen: dict[str, object] = {}
    for name in NAMES:
        config = registry.lookup("optimizer", name).Config
        assert config.__dataclass_params__.frozen
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            assert f.metadata.get("help")
            assert seen.setdefault(f.name, hints[f.name]) == hints[f.name]
    assert set(seen) == {"lr", "momentum", "beta1", "beta2", "tau"}
    assert "beta2" not in {f.name for f in dataclasses.fields(opt.FedAdagrad.Config)}
