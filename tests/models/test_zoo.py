"""Tests for the model zoo: shapes, gradients, exact parameter counts, errors, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlearn.errors import ModelError
from fedlearn.models import MODELS, LeNet5, SeedCNN, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 32, 32)]
SUPPORTED = [
    (name, shape)
    for name in MODELS
    for shape in SHAPES
    if name != "resnet18-gn" or shape in [(3, 32, 32), (1, 28, 28)]
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "shape"), SUPPORTED)
def test_logits_shape_and_gradients_reach_every_parameter(name: str, shape: tuple) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_seed_cnn_is_the_seed_architecture_on_1x32x32() -> None:
    model = build_model("seed-cnn", (1, 32, 32), 10)
    assert isinstance(model, SeedCNN)
    assert model.flat_features == 64 * 5 * 5 == 1600
    assert model.conv1.padding == (0, 0) and model.conv2.padding == (0, 0)
    expected = (
        (32 * 1 * 25 + 32)  # conv1: 832
        + (64 * 32 * 25 + 64)  # conv2: 51,264
        + (1600 * 120 + 120)  # fc1: 192,120
        + (120 * 84 + 84)  # fc2: 10,164
        + (84 * 10 + 10)  # fc3: 850
    )
    assert expected == 255_230
    assert n_params(model) == expected


def test_seed_cnn_pads_small_inputs() -> None:
    model = build_model("seed-cnn", (1, 8, 8), 10)
    assert model.conv1.padding == (2, 2) and model.flat_features == 64 * 2 * 2


def test_mcmahan_parameter_counts() -> None:
    assert n_params(build_model("mcmahan-2nn", (1, 28, 28), 10)) == 199_210
    assert n_params(build_model("mcmahan-cnn", (1, 28, 28), 10)) == 1_663_370


def test_lenet5_classic_sizes_and_activations() -> None:
    lenet = build_model("lenet5", (1, 28, 28), 10)
    assert lenet.features[0].padding == (2, 2) and lenet.flat_features == 16 * 5 * 5
    assert build_model("lenet5", (3, 32, 32), 10).features[0].padding == (0, 0)
    assert any(isinstance(m, nn.ReLU) for m in lenet.modules())
    sig = LeNet5(1, 10, 28, activation="sigmoid")
    assert any(isinstance(m, nn.Sigmoid) for m in sig.modules())
    assert not any(isinstance(m, nn.ReLU) for m in sig.modules())
    assert sig(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ModelError, match="activation"):
        LeNet5(1, 10, 28, activation="gelu")


def test_resnet18_gn_uses_groupnorm_and_small_stem() -> None:
    model = build_model("resnet18-gn", (1, 28, 28), 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 2 for m in gns)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)


def test_resnet18_gn_keeps_imagenet_stem_for_large_images() -> None:
    model = build_model("resnet18-gn", (1, 96, 96), 10)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)


def test_no_model_holds_batchnorm() -> None:
    for name in MODELS:
        model = build_model(name, (3, 32, 32), 10)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_name_lists_allowed_models() -> None:
    with pytest.raises(ModelError, match="mcmahan-2nn") as info:
        build_model("vgg16", (1, 28, 28), 10)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["seed-cnn", "mcmahan-cnn"])
def test_too_small_input_suggests_another_model(name: str) -> None:
    with pytest.raises(ModelError, match="use mcmahan-2nn"):
        build_model(name, (1, 3, 3), 10)


@pytest.mark.parametrize("shape", [(28, 28), (1, 0, 28), (1, 28.0, 28), "1x28x28"])
def test_bad_input_shape(shape: object) -> None:
    with pytest.raises(ModelError, match="input_shape"):
        build_model("mcmahan-2nn", shape, 10)  # type: ignore[arg-type]


def test_bad_num_classes() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("lenet5", (1, 28, 28), 0)


@pytest.mark.parametrize("name", MODELS)
def test_build_is_deterministic_under_manual_seed(name: str) -> None:
    shape = (3, 32, 32)
    torch.manual_seed(123)
    a = build_model(name, shape, 10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, shape, 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
