"""Edge inference on one CPU core: PyTorch eager against ONNX Runtime float and int8, on MNIST.

For the seed CNN and ResNet-18-GN (28x28 MNIST, CIFAR stem) the script trains briefly and
centrally (Adam lr 1e-3, batch 32, seed 0; the CNN on all 60,000 images once, the ResNet on
16,000, about 20 minutes on one shared core), exports each with ``fedlearn.export`` (float ONNX,
then int8 static QDQ calibrated on 256 seeded training images) and measures:

- accuracy of each engine on the official 10,000-image MNIST test set, the largest logit
  difference of ONNX float from PyTorch, and top-1 agreement of int8 with PyTorch;
- latency at batch 1: the median (and p10/p90) of 200 single-image calls per engine, after 20
  warm-up calls, with the three engines interleaved (a rotating order, the same image for all
  three in each round) so that background load hits them alike;
- throughput at batch 64: images per second from the median of 15 interleaved calls;
- int8 variants (QOperator instead of QDQ, per-tensor weights, full 8-bit weights): latency
  and agreement with PyTorch on the first 2,000 test images, to show what each choice costs.

Everything runs with ``torch.set_num_threads(1)`` and onnxruntime ``intra_op_num_threads=1``.

    python benchmarks/edge_inference.py                 # full run -> benchmarks/results/edge_inference.json
    python benchmarks/edge_inference.py --quick         # smoke run, writes nothing unless --output
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from machine import machine_info, write_results

from fedlearn.data import DatasetBundle, load_dataset
from fedlearn.export import EdgeModel, calibration_sample, export_onnx, metadata_for, quantize_int8
from fedlearn.models import build_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mnist"
MODELS = ("seed-cnn", "resnet18-gn")
ENGINES = ("pytorch_eager", "onnx_float", "onnx_int8")
EVAL_BATCH = 500
THROUGHPUT_BATCH = 64
CALIBRATION_IMAGES = 256
TRAIN_BATCH = 32
TRAIN_LR = 1e-3
VARIANTS = {  # name -> quantize_int8 options; "default" is what fedlearn export --int8 writes
    "default (qdq, per-channel, 7-bit weights)": {},
    "qoperator": {"quant_format": "qoperator"},
    "per-tensor weights": {"per_channel": False},
    "8-bit weights (no reduce_range)": {"reduce_range": False},
}


def train(model: torch.nn.Module, bundle: DatasetBundle, images: int, epochs: int, seed: int) -> dict[str, Any]:
    """Plain centralized Adam on ``images`` seeded training images; returns what was done and how long it took."""
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(bundle.train), generator=generator)[:images]
    x_all, y_all = bundle.train.x[subset], bundle.train.y[subset]
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    model.train()
    start = time.perf_counter()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for i in range(0, len(order), TRAIN_BATCH):
            batch = order[i:i + TRAIN_BATCH]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return {"images": int(len(y_all)), "epochs": epochs, "batch_size": TRAIN_BATCH, "steps": step,
            "optimizer": f"Adam lr {TRAIN_LR}", "seconds": round(time.perf_counter() - start, 1)}


class Engines:
    """The three ways to run one model: a callable per engine taking a float32 NCHW numpy batch."""

    def __init__(self, model: torch.nn.Module, float_path: Path, int8_path: Path) -> None:
        self.model = model
        self.float = EdgeModel(float_path, threads=1)
        self.int8 = EdgeModel(int8_path, threads=1)

    def eager(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()

    def calls(self) -> dict[str, Any]:
        return {"pytorch_eager": self.eager, "onnx_float": self.float.logits, "onnx_int8": self.int8.logits}


def logits_on(run, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def interleaved_times(calls: dict[str, Any], inputs: list[np.ndarray], warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each engine; round r feeds inputs[r] to every engine, starting at engine r mod 3."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r, batch in enumerate(inputs):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start = time.perf_counter()
            calls[name](batch)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median": round(float(np.median(ms)), 3), "p10": round(float(np.percentile(ms, 10)), 3),
            "p90": round(float(np.percentile(ms, 90)), 3), "mean": round(float(ms.mean()), 3), "n": int(ms.size)}


def graph_ops(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(node.op_type for node in onnx.load_model(str(path)).graph.node).most_common())


def executed_ops(path: Path, folder: Path) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs after its optimizations (QDQ pairs fused into QLinear ops)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # not the warning that the saved graph is tuned to this CPU: we only count ops
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return graph_ops(Path(options.optimized_model_filepath))


def measure_variants(model: torch.nn.Module, float_path: Path, calibration: np.ndarray, meta, x: np.ndarray,
                     ref_top1: np.ndarray, runs: int, folder: Path) -> dict[str, Any]:
    """Latency and agreement of each int8 variant, interleaved with PyTorch eager as the common baseline."""
    sessions: dict[str, Any] = {}
    for name, options in VARIANTS.items():
        path, _ = quantize_int8(float_path, folder / f"variant{len(sessions)}.onnx", calibration, meta, **options)
        sessions[name] = EdgeModel(path, threads=1)

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    calls = {"pytorch_eager": eager, **{name: s.logits for name, s in sessions.items()}}
    times = interleaved_times(calls, [x[i % len(x)][None] for i in range(runs + 10)], warmup=10)
    eager_ms = statistics.median(times["pytorch_eager"]) * 1e3
    out = {}
    for name, session in sessions.items():
        top1 = logits_on(session.logits, x).argmax(1)
        ms = statistics.median(times[name]) * 1e3
        out[name] = {"latency_ms_median": round(ms, 3), "speedup_vs_eager": round(eager_ms / ms, 2),
                     "top1_agreement_with_pytorch": round(float((top1 == ref_top1).mean()), 4)}
    out["pytorch_eager_latency_ms_median"] = round(eager_ms, 3)
    out["agreement_images"] = int(len(x))
    return out


def bench_model(name: str, bundle: DatasetBundle, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_model(name, bundle.input_shape, bundle.num_classes)
    images = args.cnn_train_images if name == "seed-cnn" else args.resnet_train_images
    print(f"[{name}] training on {images} images for {args.epochs} epoch(s) ...", flush=True)
    training = train(model, bundle, images, args.epochs, args.seed)
    meta = metadata_for(name, bundle)
    float_path = export_onnx(model, meta, folder / f"{name}.onnx")
    calibration = calibration_sample(bundle.train.x, CALIBRATION_IMAGES, seed=args.seed)
    int8_path, int8_meta = quantize_int8(float_path, folder / f"{name}.int8.onnx", calibration, meta,
                                         calibration_info={"source": "MNIST training split", "seed": args.seed})
    engines = Engines(model, float_path, int8_path)
    calls = engines.calls()

    x_test = bundle.test.x[: args.test_images].numpy()
    y_test = bundle.test.y[: args.test_images].numpy()
    print(f"[{name}] accuracy on {len(y_test)} test images ...", flush=True)
    logits = {engine: logits_on(run, x_test) for engine, run in calls.items()}
    accuracy = {engine: round(float((v.argmax(1) == y_test).mean()), 4) for engine, v in logits.items()}
    ref_top1 = logits["pytorch_eager"].argmax(1)

    print(f"[{name}] batch-1 latency, {args.latency_runs} interleaved calls per engine ...", flush=True)
    singles = [x_test[i % len(x_test)][None] for i in range(args.latency_runs + args.warmup)]
    latency = {k: summary_ms(v) for k, v in interleaved_times(calls, singles, args.warmup).items()}
    print(f"[{name}] batch-{THROUGHPUT_BATCH} throughput ...", flush=True)
    batches = [x_test[(i * THROUGHPUT_BATCH) % (len(x_test) - THROUGHPUT_BATCH):][:THROUGHPUT_BATCH]
               for i in range(args.throughput_runs + 2)]
    batch_times = interleaved_times(calls, batches, warmup=2)
    throughput = {k: round(THROUGHPUT_BATCH / statistics.median(v), 1) for k, v in batch_times.items()}

    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": training,
        "accuracy": accuracy,
        "accuracy_drop_points_int8_vs_eager": round(100 * (accuracy["pytorch_eager"] - accuracy["onnx_int8"]), 2),
        "onnx_float_max_abs_logit_diff": float(np.abs(logits["onnx_float"] - logits["pytorch_eager"]).max()),
        "int8_top1_agreement_with_pytorch": round(float((logits["onnx_int8"].argmax(1) == ref_top1).mean()), 4),
        "latency_batch1_ms": latency,
        "speedup_batch1_vs_eager": {k: round(latency["pytorch_eager"]["median"] / v["median"], 2)
                                    for k, v in latency.items()},
        "throughput_batch64_images_per_s": throughput,
        "file_bytes": {"onnx_float": float_path.stat().st_size, "onnx_int8": int8_path.stat().st_size},
        "int8_quantization": int8_meta.quantization,
        "int8_graph_ops_in_file": graph_ops(int8_path),
        "int8_graph_ops_executed": executed_ops(int8_path, folder),
    }
    if args.variants:
        print(f"[{name}] int8 variants ...", flush=True)
        n = min(2000, len(x_test))
        result["int8_variants"] = measure_variants(model, float_path, calibration, meta, x_test[:n], ref_top1[:n],
                                                   args.variant_runs, folder)
    print(f"[{name}] accuracy {accuracy}; batch-1 median ms "
          f"{ {k: v['median'] for k, v in latency.items()} }; speedups {result['speedup_batch1_vs_eager']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with MNIST's four IDX .gz files")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cnn-train-images", type=int, default=60000)
    parser.add_argument("--resnet-train-images", type=int, default=16000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput-runs", type=int, default=15)
    parser.add_argument("--variant-runs", type=int, default=100)
    parser.add_argument("--no-variants", dest="variants", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training, 500 test images")
    parser.add_argument("--output", help="results JSON (default benchmarks/results/edge_inference.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cnn_train_images = args.resnet_train_images = 640
        args.test_images, args.latency_runs, args.warmup, args.throughput_runs, args.variant_runs = 500, 30, 5, 3, 20
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if not Path(args.data_dir).is_dir():
        print(f"MNIST not found in {args.data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    bundle = load_dataset("mnist", args.data_dir, download=False)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        for name in args.models:
            results[name] = bench_model(name, bundle, args, Path(tmp))
    import onnx
    import onnxruntime

    doc = {
        "benchmark": "edge_inference",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__),
        "settings": {"torch_threads": 1, "onnxruntime_intra_op_threads": 1, "onnxruntime_inter_op_threads": 1,
                     "onnxruntime_graph_optimization": "ORT_ENABLE_ALL (default)",
                     "dataset": "MNIST (official test set)", "test_images": args.test_images,
                     "latency_runs": args.latency_runs, "warmup": args.warmup,
                     "throughput_batch": THROUGHPUT_BATCH, "throughput_runs": args.throughput_runs,
                     "calibration_images": CALIBRATION_IMAGES, "seed": args.seed, "quick": args.quick},
        "goal": "ONNX int8 >= 2x faster than PyTorch eager for resnet18-gn at batch 1, <= 1 point accuracy lost",
        "models": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if "resnet18-gn" in results:
        r = results["resnet18-gn"]
        doc["goal_met"] = bool(r["speedup_batch1_vs_eager"]["onnx_int8"] >= 2.0
                               and r["accuracy_drop_points_int8_vs_eager"] <= 1.0)
    if args.output or not args.quick:
        write_results(Path(args.output) if args.output else RESULTS / "edge_inference.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
