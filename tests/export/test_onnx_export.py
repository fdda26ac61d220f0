"""ONNX export: float parity with PyTorch, embedded metadata, int8 agreement, and the quantizer's graph fix-up."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fedlearn.data import load_dataset
from fedlearn.export import (
    EdgeModel,
    EdgeModelError,
    calibration_sample,
    export_onnx,
    metadata_for,
    quantize_int8,
    read_metadata,
)
from fedlearn.export.quantize import unshare_initializers
from fedlearn.models import build_model


def _torch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def test_float_onnx_matches_pytorch(run_model, float_onnx) -> None:
    x = run_model.bundle.test.x
    edge = EdgeModel(float_onnx)
    ref = _torch_logits(run_model.model, x)
    assert np.abs(edge.logits(x.numpy()) - ref).max() < 1e-4
    one = edge.logits(x[:1].numpy())  # the batch axis is dynamic: batch 1 works too
    assert one.shape == (1, 10) and np.abs(one - ref[:1]).max() < 1e-4


def test_metadata_is_embedded(run_model, float_onnx) -> None:
    assert read_metadata(float_onnx) == run_model.metadata
    session = EdgeModel(float_onnx).session
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[1:] == [1, 8, 8]


def test_int8_agrees_with_pytorch_on_the_test_set(run_model, int8_onnx) -> None:
    x = run_model.bundle.test.x
    ref = _torch_logits(run_model.model, x).argmax(1)
    got = EdgeModel(int8_onnx).logits(x.numpy()).argmax(1)
    agreement = float((got == ref).mean())
    assert agreement >= 0.99, f"int8 top-1 agreement {agreement:.4f} on {len(ref)} digits test images"


def test_int8_model_is_quantized_and_says_so(int8_onnx, float_onnx) -> None:
    meta = read_metadata(int8_onnx)
    assert meta.quantization.startswith("int8 static (qdq, per-channel 7-bit")
    assert meta.calibration["images"] == 256 and meta.calibration["seed"] == 0
    proto = onnx.load_model(str(int8_onnx))
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 3
    int8_weights = [i for i in proto.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == 2  # both conv kernels
    assert int8_onnx.stat().st_size < 0.4 * float_onnx.stat().st_size


def test_calibration_sample_is_seeded_rows_of_the_data() -> None:
    images = torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1)
    a = calibration_sample(images, 8, seed=3)
    assert a.shape == (8, 1, 1, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, calibration_sample(images, 8, seed=3))
    assert len(set(a.ravel().tolist())) == 8 and set(a.ravel().tolist()) <= set(range(50))
    assert calibration_sample(images, 500, seed=0).shape[0] == 50


def test_unshare_initializers_gives_each_node_its_own_copy() -> None:
    scale = numpy_helper.from_array(np.ones(2, dtype=np.float32), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["y"]), helper.make_node("Mul", ["y", "scale"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])], [scale])
    proto = helper.make_model(graph)
    assert unshare_initializers(proto) == 1
    assert proto.graph.node[0].input[1] == "scale" and proto.graph.node[1].input[1] != "scale"
    assert len(proto.graph.initializer) == 2
    onnx.checker.check_model(proto)


def test_file_without_metadata_is_refused(tmp_path) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])])
    path = tmp_path / "plain.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with pytest.raises(EdgeModelError, match="no FedLearn metadata"):
        read_metadata(path)
    with pytest.raises(EdgeModelError, match="no FedLearn metadata"):
        EdgeModel(path)


@pytest.mark.slow
def test_resnet18_gn_float_parity(run_model, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18-gn", (1, 8, 8), 10).eval()
    meta = metadata_for("resnet18-gn", run_model.bundle)
    path = export_onnx(model, meta, tmp_path / "resnet.onnx")
    x = run_model.bundle.test.x[:64]
    assert np.abs(EdgeModel(path).logits(x.numpy()) - _torch_logits(model, x)).max() < 1e-4


@pytest.mark.slow
def test_int8_agreement_on_mnist_test_set(shared_dataset, tmp_path) -> None:
    """seed-cnn briefly trained on 6,000 MNIST images; int8 must agree on >= 99% of the 10,000 test images."""
    bundle = load_dataset("mnist", shared_dataset("mnist"), download=False)
    torch.manual_seed(0)
    model = build_model("seed-cnn", bundle.input_shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = bundle.train.x[:6000], bundle.train.y[:6000]
    for start in range(0, len(y), 64):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
        optimizer.step()
    model.eval()
    meta = metadata_for("seed-cnn", bundle)
    float_path = export_onnx(model, meta, tmp_path / "mnist.onnx")
    int8_path, _ = quantize_int8(float_path, tmp_path / "mnist.int8.onnx",
                                 calibration_sample(bundle.train.x, 256, seed=0), meta)
    ref = _torch_logits(model, bundle.test.x).argmax(1)
    assert float((ref == bundle.test.y.numpy()).mean()) > 0.9  # trained enough for the comparison to mean something
    got = EdgeModel(int8_path).logits(bundle.test.x.numpy()).argmax(1)
    assert float((got == ref).mean()) >= 0.99
