"""Privacy audit: attack each victim's FedSGD update (one image each) and measure what leaks, with or without DP."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedlearn.attacks.gradient_inversion import invert_gradient, invert_gradient_cosine, recover_label
from fedlearn.attacks.metrics import psnr, to_pixels
from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.seeding import derive_seed
from fedlearn.transforms import Clip, GaussianNoise


def normalize(images: torch.Tensor, mean: float | Sequence[float] | None, std: float | Sequence[float] | None
              ) -> torch.Tensor:
    """Map [0, 1] images (N, C, H, W) to the model's input space, ``(x - mean) / std`` per channel."""
    if mean is None and std is None:
        return images
    m = torch.as_tensor(0.0 if mean is None else mean, dtype=images.dtype).reshape(1, -1, 1, 1)
    s = torch.as_tensor(1.0 if std is None else std, dtype=images.dtype).reshape(1, -1, 1, 1)
    return (images - m) / s


def audit_images(name: str = "digits", count: int = 8, size: int | None = 32, *, split: str = "test",
                 data_dir: str | None = None, interpolation: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of a built-in dataset in [0, 1] pixels (classes in turn: 0, 1, 2, ...), resized to ``size``."""
    from fedlearn.data import load_dataset

    bundle = load_dataset(name, data_dir)
    data = bundle.test if split == "test" else bundle.train
    y = data.y
    order: list[int] = []
    per_class = [torch.nonzero(y == c).flatten().tolist() for c in range(bundle.num_classes)]
    for k in range(count):
        pool = per_class[k % bundle.num_classes]
        if k // bundle.num_classes < len(pool):
            order.append(pool[k // bundle.num_classes])
    if len(order) < count:
        raise ConfigError(f"{name} {split} has too few images per class for {count} audit images; ask for fewer")
    index = torch.tensor(order)
    images = to_pixels(data.x[index], bundle.mean, bundle.std).float()
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        extra = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
        images = F.interpolate(images, size=(size, size), mode=interpolation, **extra).clamp(0, 1)
    return images, y[index].clone()


def client_payload(model: nn.Module, image: torch.Tensor, label: int, *, clip_norm: float = 0.0,
                   noise_multiplier: float = 0.0, noise_seed: int | None = None) -> torch.Tensor:
    """What the attacker sees of one client's FedSGD update on one example (model-space image (C, H, W)).

    The payload is the client's real answer (LocalTrainer, ``mode="gradient"``, ``clip_norm``
    clipping on the client); with ``noise_multiplier`` z > 0, N(0, (z C)^2) is added to every
    coordinate: local DP, or central DP as the released sum of a round with this one client
    (DP-FedAvg divides by the expected client count m, which scales signal and noise alike).
    """
    if noise_multiplier > 0 and clip_norm <= 0:
        raise ConfigError("DP noise needs a clip norm: set clip_norm > 0 together with noise_multiplier")
    data = ClientData(ArrayDataset(image.unsqueeze(0).float(), torch.tensor([int(label)])))
    app = ClientApp(LocalTrainer(model, device="cpu"), {"victim": data}, seeded_privacy=noise_seed)
    config = {**LocalConfig(mode="gradient").to_dict(), "uplink": ["gradient"]}
    if clip_norm > 0:
        config["transforms"] = [Clip(Clip.Config(clip_norm)).request()]
        if noise_multiplier > 0:
            config["transforms"].append(GaussianNoise(GaussianNoise.Config(noise_multiplier * clip_norm)).request())
    task = TrainTask(round=0, client_id="victim", arrays={"weights": ModelVector(model).read()}, config=config)
    return app.train(task).arrays["gradient"]


@dataclass
class AuditResult:
    """Per-image outcomes of one audit and their summaries (PSNR in dB on [0, 1] pixels).

    ``baseline_psnrs`` score a blank mid-gray guess: a reconstruction no better than that leaks no picture.
    """

    labels: list[int]
    recovered_labels: list[int]
    psnrs: list[float]
    originals: torch.Tensor
    reconstructions: torch.Tensor
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    seconds: float = 0.0
    baseline_psnrs: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def label_correct(self) -> list[bool]:
        return [a == b for a, b in zip(self.labels, self.recovered_labels)]

    @property
    def label_accuracy(self) -> float:
        return sum(self.label_correct) / max(len(self.labels), 1)

    @property
    def mean_psnr(self) -> float:
        return statistics.fmean(min(p, 100.0) for p in self.psnrs)  # an exact match (inf) counts as 100 dB

    @property
    def median_psnr(self) -> float:
        return statistics.median(self.psnrs)

    def summary(self) -> dict:
        """Plain numbers for a report or a JSON file."""
        return {
            "images": len(self.labels),
            "label_accuracy": self.label_accuracy,
            "mean_psnr_db": self.mean_psnr,
            "median_psnr_db": self.median_psnr,
            "psnr_db": [p if math.isfinite(p) else 100.0 for p in self.psnrs],
            "baseline_psnr_db": statistics.fmean(self.baseline_psnrs) if self.baseline_psnrs else None,
            "labels": self.labels,
            "recovered_labels": self.recovered_labels,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "epsilon": release_epsilon(self.noise_multiplier),
            "epsilon_is": f"one Gaussian release of one example's clipped update, add/remove one, delta "
                          f"{AUDIT_DELTA:g}",
            "seconds": self.seconds,
            **self.settings,
        }


AUDIT_DELTA = 1e-5
ATTACKS = ("dlg", "cosine")


def release_epsilon(noise_multiplier: float, delta: float = AUDIT_DELTA) -> float | None:
    """Epsilon of the audited release: one Gaussian mechanism N(0, (z C)^2) on an update clipped to C (None: no
    noise, no guarantee)."""
    if noise_multiplier <= 0:
        return None
    from fedlearn.privacy.accountant import PrivacyAccountant  # dp_accounting only when there is noise

    return PrivacyAccountant(noise_multiplier=noise_multiplier, sampling_rate=1.0, delta=delta).epsilon_after(1)


def audit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
    iterations: int | None = None,
    lr: float | None = None,
    init: str = "uniform",
    seed: int = 0,
    attack: str = "dlg",
    tv_weight: float = 1e-2,
) -> AuditResult:
    """Attack one FedSGD update per image: iDLG label, then DLG (``attack="dlg"``, L-BFGS on the gradient distance)
    or Geiping et al.'s noise-robust ``"cosine"`` attack (Adam on cosine distance plus ``tv_weight`` x TV); PSNR
    against the original.

    ``images`` are [0, 1] pixels (N, C, H, W); the model sees ``(x - mean) / std`` (identity when
    both are None) and the reconstruction is mapped back and clipped to [0, 1]. All updates are
    taken at the model's current weights. The DP noise is seeded from ``seed`` so audits repeat.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"--attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
    iterations = iterations if iterations is not None else (100 if attack == "dlg" else 400)  # L-BFGS / Adam steps
    lr = lr if lr is not None else (1.0 if attack == "dlg" else 0.1)
    if images.dim() != 4 or images.shape[0] != len(labels):
        raise ConfigError(f"audit needs images (N, C, H, W) and N labels; got {tuple(images.shape)} and {len(labels)}")
    start = time.perf_counter()
    model_inputs = normalize(images.float(), mean, std)
    labels = [int(v) for v in labels]
    recovered, psnrs, recons, baseline = [], [], [], []
    for i, (x, y) in enumerate(zip(model_inputs, labels)):
        payload = client_payload(model, x, y, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                 noise_seed=derive_seed(seed, "audit-noise", i))
        label = recover_label(model, payload)
        common = dict(iterations=iterations, seed=derive_seed(seed, "audit-dummy", i), init=init,
                      clip_norm=clip_norm if clip_norm > 0 else None, mean=mean, std=std)
        if attack == "dlg":
            recon = invert_gradient(model, payload, tuple(x.shape), label, lr=lr, **common)
        else:
            recon = invert_gradient_cosine(model, payload, tuple(x.shape), label, lr=lr, tv_weight=tv_weight,
                                           **common)
        pixels = to_pixels(recon, mean, std)[0].float()
        recovered.append(label)
        psnrs.append(psnr(pixels, images[i].float()))
        recons.append(pixels)
        baseline.append(psnr(torch.full_like(pixels, 0.5), images[i].float()))
    return AuditResult(
        labels=labels, recovered_labels=recovered, psnrs=psnrs, originals=images.detach().float().clone(),
        reconstructions=torch.stack(recons), clip_norm=clip_norm, noise_multiplier=noise_multiplier,
        seconds=time.perf_counter() - start, baseline_psnrs=baseline,
        settings={"attack": attack, "iterations": iterations, "lr": lr, "init": init, "seed": seed,
                  **({"tv_weight": tv_weight} if attack == "cosine" else {})},
    )
