"""Tests for the flat-vector protocol: ParamSpec, ModelVector, check_vector, same_architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlearn.errors import InvalidUpdateError, ModelError
from fedlearn.protocol.params import ModelVector, ParamSpec, check_vector, flatten_module, same_architecture

torch.set_num_threads(1)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 10),
    )


def linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class Mixed(nn.Module):
    """Parameters plus float32 / float64 / integer buffers, to check dtypes and exclusions."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale64", torch.arange(4, dtype=torch.float64).reshape(2, 2) / 3)
        self.register_buffer("count", torch.tensor(7, dtype=torch.long))
        self.register_buffer("bias32", torch.full((5,), 0.25))


def test_spec_from_module_lists_floating_entries_in_state_dict_order() -> None:
    model = bn_net()
    spec = ParamSpec.from_module(model)
    assert spec.names == (
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "4.weight",
        "4.bias",
    )
    assert spec.shapes == ((3, 1, 3, 3), (3,), (3,), (3,), (3,), (3,), (10, 108), (10,))
    assert spec.dtypes == ("float32",) * 8
    assert spec.numels == (27, 3, 3, 3, 3, 3, 1080, 10)
    assert spec.numel == 27 + 3 * 5 + 1080 + 10


def test_integer_buffers_excluded_float_buffers_included() -> None:
    model = bn_net()
    spec = ParamSpec.from_module(model)
    assert "1.num_batches_tracked" in model.state_dict()
    assert "1.num_batches_tracked" not in spec.names
    assert "1.running_mean" in spec.names and "1.running_var" in spec.names

    mixed = ParamSpec.from_module(Mixed())
    # a module's own buffers come before its children's entries in state_dict order
    assert mixed.names == ("scale64", "bias32", "lin.weight", "lin.bias")
    assert mixed.dtypes == ("float64", "float32", "float32", "float32")


def test_spec_dict_round_trip() -> None:
    for model in (bn_net(), Mixed(), linear_net()):
        spec = ParamSpec.from_module(model)
        data = spec.to_dict()
        assert data["names"] == list(spec.names)
        assert all(isinstance(s, list) for s in data["shapes"])
        back = ParamSpec.from_dict(data)
        assert back == spec
        assert hash(back) == hash(spec)
        assert back.fingerprint() == spec.fingerprint()


def test_read_equals_state_dict_values_exactly() -> None:
    model = bn_net()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.5, 2.0]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.25, 3.0]))
    mv = ModelVector(model)
    vec = mv.read()
    assert vec.dtype == torch.float32 and vec.dim() == 1 and vec.numel() == mv.spec.numel
    state = model.state_dict()
    expected = torch.cat([state[n].reshape(-1) for n in mv.spec.names])
    assert torch.equal(vec, expected)
    assert torch.equal(flatten_module(model), expected)
    # read() is a new tensor, not a view into the weights
    vec.zero_()
    assert not torch.equal(mv.read(), vec)


def test_load_then_read_round_trip_and_state_dict_match() -> None:
    model = bn_net()
    mv = ModelVector(model)
    before_count = model[1].num_batches_tracked.clone()
    g = torch.Generator().manual_seed(1)
    new = torch.randn(mv.spec.numel, generator=g)
    mv.load(new)
    assert torch.equal(mv.read(), new)
    state = model.state_dict()
    for name, piece in zip(mv.spec.names, new.split(mv.spec.numels)):
        assert torch.equal(state[name], piece.reshape(state[name].shape)), name
    # integer buffer untouched
    assert torch.equal(model[1].num_batches_tracked, before_count)
    # load is in place: the same tensor objects hold the new values
    assert model[4].weight is dict(model.named_parameters())["4.weight"]


def test_load_into_a_second_model_makes_it_identical() -> None:
    a, b = bn_net(), bn_net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    ModelVector(b).load(ModelVector(a).read())
    x = torch.randn(4, 1, 8, 8)
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))


def test_unflatten_restores_names_shapes_dtypes() -> None:
    model = Mixed()
    spec = ParamSpec.from_module(model)
    vec = flatten_module(model)
    out = spec.unflatten(vec)
    assert list(out) == list(spec.names)
    state = model.state_dict()
    for name in spec.names:
        assert out[name].shape == state[name].shape, name
        assert out[name].dtype == state[name].dtype, name
    assert out["scale64"].dtype == torch.float64
    assert torch.equal(out["lin.weight"], state["lin.weight"])
    assert torch.equal(out["bias32"], state["bias32"])
    # float64 went through float32 in the vector
    assert torch.equal(out["scale64"], state["scale64"].float().double())

    bn = bn_net()
    bspec = ParamSpec.from_module(bn)
    bout = bspec.unflatten(flatten_module(bn))
    for name, t in bout.items():
        assert torch.equal(t, bn.state_dict()[name]), name


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(0),
        torch.zeros(11),
        torch.zeros(9),
        torch.zeros(2, 5),
        torch.zeros(1, 10),
        torch.zeros(()),
    ],
)
def test_check_vector_refuses_wrong_size_or_rank(bad: torch.Tensor) -> None:
    spec = ParamSpec(("w",), ((2, 5),), ("float32",))
    with pytest.raises(InvalidUpdateError):
        check_vector(bad, spec)
    with pytest.raises(InvalidUpdateError):
        spec.unflatten(bad)


def test_check_vector_accepts_right_vector_and_load_refuses_wrong() -> None:
    model = linear_net()
    mv = ModelVector(model)
    check_vector(torch.zeros(650), mv.spec)
    before = mv.read()
    with pytest.raises(InvalidUpdateError):
        mv.load(torch.zeros(649))
    with pytest.raises(InvalidUpdateError):
        mv.load(torch.zeros(2, 325))
    assert torch.equal(mv.read(), before)


def test_read_grad_zeros_for_buffers_and_param_grads_otherwise() -> None:
    model = bn_net()
    mv = ModelVector(model)
    model.train()
    # before any backward, every entry is zero
    assert torch.equal(mv.read_grad(), torch.zeros(mv.spec.numel))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    F.cross_entropy(model(x), y).backward()
    grad = mv.read_grad()
    assert grad.numel() == mv.spec.numel
    params = dict(model.named_parameters())
    for name, piece in zip(mv.spec.names, grad.split(mv.spec.numels)):
        if name in params:
            assert torch.equal(piece, params[name].grad.reshape(-1)), name
            assert piece.abs().sum() > 0, name
        else:
            assert name.endswith(("running_mean", "running_var"))
            assert torch.equal(piece, torch.zeros_like(piece)), name


def test_same_architecture_accepts_equal_and_raises_model_error_otherwise() -> None:
    same_architecture(ParamSpec.from_module(bn_net()), ParamSpec.from_module(bn_net()), "client 1")
    with pytest.raises(ModelError, match="client 1"):
        same_architecture(ParamSpec.from_module(bn_net()), ParamSpec.from_module(linear_net()), "client 1")
    # same numel, different shapes
    a = ParamSpec.from_module(nn.Linear(4, 6))
    b = ParamSpec.from_module(nn.Linear(6, 4))
    assert a.numel != b.numel or a.shapes != b.shapes
    with pytest.raises(ModelError):
        same_architecture(a, b, "x")
    c = ParamSpec.from_module(nn.Sequential(nn.Linear(5, 5)))
    d = ParamSpec.from_module(nn.Sequential(nn.Identity(), nn.Linear(5, 5)))
    assert c.numel == d.numel
    with pytest.raises(ModelError):
        same_architecture(c, d, "x")


def test_fingerprint_stable_and_differs_across_architectures() -> None:
    fps = {
        ParamSpec.from_module(m).fingerprint()
        for m in (
            bn_net(),
            linear_net(),
            nn.Linear(64, 10),  # same shapes as linear_net, different names
            nn.Sequential(nn.Flatten(), nn.Linear(64, 11)),
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double(),
        )
    }
    assert len(fps) == 5
    assert ParamSpec.from_module(bn_net()).fingerprint() == ParamSpec.from_module(bn_net()).fingerprint()
    fp = ParamSpec.from_module(bn_net()).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_float32_entries_share_one_buffer_that_training_writes_into() -> None:
    """Parameters and float buffers become views of one flat buffer: load, read and delta are one pass, and
    what an optimizer step and a BatchNorm forward write in place is what the vector reads."""
    model = bn_net()
    values = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    mv = ModelVector(model)
    assert mv._shared() is not None
    assert dict(model.named_parameters()) == params  # the same Parameter objects, re-pointed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values.items())  # values kept
    start = mv.read()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    F.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
    optimizer.step()
    state = model.state_dict()
    expected = torch.cat([state[n].reshape(-1) for n in mv.spec.names])
    assert torch.equal(mv.read(), expected)
    assert not torch.equal(expected, start)
    assert torch.equal(mv.delta(start), expected - start)
    assert not torch.equal(model[1].running_mean, values["1.running_mean"])  # the buffer view was updated


def test_moving_the_module_is_noticed_and_the_vector_stays_right() -> None:
    model = bn_net()
    mv = ModelVector(model)
    model.double().float()  # new storage for every entry (new buffer objects): the shared buffer is stale
    new = torch.randn(mv.spec.numel, generator=torch.Generator().manual_seed(2))
    mv.load(new)
    state = model.state_dict()
    assert torch.equal(torch.cat([state[n].reshape(-1) for n in mv.spec.names]), new)
    assert torch.equal(mv.read(), new) and torch.equal(mv.delta(new), torch.zeros_like(new))


def test_mixed_dtypes_are_not_shared_and_still_round_trip() -> None:
    model = Mixed()
    mv = ModelVector(model)
    assert mv._shared() is None  # a float64 buffer: per-tensor copies
    new = torch.arange(mv.spec.numel, dtype=torch.float32) / 7
    mv.load(new)
    assert torch.equal(mv.read(), new)


def test_a_reassigned_buffer_of_a_mixed_model_is_followed() -> None:
    model = Mixed()
    mv = ModelVector(model)
    model.bias32 = torch.zeros(5)  # a new buffer object, as .to() makes
    new = torch.arange(mv.spec.numel, dtype=torch.float32)
    mv.load(new)
    pieces = dict(zip(mv.spec.names, new.split(mv.spec.numels)))
    assert torch.equal(model.state_dict()["bias32"], pieces["bias32"])
