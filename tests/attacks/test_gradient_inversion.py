"""Gradient inversion (DLG + iDLG) against one client's FedSGD update, with and without DP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlearn.attacks import (
    DLGLeNet,
    audit,
    audit_images,
    client_payload,
    gradients_from_vector,
    grid_image,
    idlg_label,
    invert_gradient,
    psnr,
    recover_label,
    release_epsilon,
    save_grid,
    to_pixels,
)
from fedlearn.attacks.gradient_inversion import total_variation
from fedlearn.errors import ConfigError

# One thread: these are thousands of tiny double-backward passes on a 32x32 image, where a second
# thread only adds synchronisation (8 audits: ~5.6 s on 1 thread, 9-70 s on 2 on a busy 2-core box).
THREADS = 1
CLIP = 4.0  # about 0.3x the per-example gradient norm (12.5-14.3) of the untrained net, so clipping is active
ITERATIONS = 100


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DLGLeNet(in_channels=1, num_classes=10, image_size=32)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return audit_images("digits", count=8, size=32)


def test_psnr_exact_values():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x, x + 0.1) == pytest.approx(20.0)
    assert psnr(x, x + 0.1, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    y = x.clone()
    y[0, 0, 0, 0] = 1.0  # MSE = 1/32
    assert psnr(x, y) == pytest.approx(10 * math.log10(32))
    assert psnr(x, x) == math.inf
    with pytest.raises(ValueError):
        psnr(x, x[:1])


def test_to_pixels_denormalizes_and_clips():
    x = torch.tensor([[[[-1.0, 0.0, 1.0, 3.0]]]])
    assert to_pixels(x, mean=0.5, std=0.25).flatten().tolist() == [0.25, 0.5, 0.75, 1.0]
    assert to_pixels(torch.tensor([-0.5, 0.5, 1.5])).tolist() == [0.0, 0.5, 1.0]


def test_audit_images_are_upsampled_pixels(digits):
    images, labels = digits
    assert images.shape == (8, 1, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.tolist() == list(range(8))


def test_idlg_label_sign_trick():
    h = torch.rand(84) + 0.1
    probs = torch.softmax(torch.randn(10), 0)
    for label in range(10):
        grad = (probs - F.one_hot(torch.tensor(label), 10).float())[:, None] * h[None, :]
        assert idlg_label(grad) == label


def test_payload_is_the_clients_gradient_and_label_recovery_works_for_every_class(model):
    x = torch.rand(1, 1, 32, 32)
    for label in range(10):
        payload = client_payload(model, x[0], label)
        grads = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([label])), list(model.parameters()))
        for got, want in zip(gradients_from_vector(model, payload), grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert recover_label(model, payload) == label


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.full((3,), 0.5))  # a floating buffer travels in the flat vector
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x - self.offset)))


def test_gradients_from_vector_drops_buffers():
    net = _WithBuffer()
    payload = client_payload(net, torch.rand(3), 1)
    assert payload.numel() == 3 + sum(p.numel() for p in net.parameters())
    grads = gradients_from_vector(net, payload)
    assert [g.shape for g in grads] == [p.shape for p in net.parameters()]
    assert recover_label(net, payload) == 1


def test_invert_gradient_from_a_list_with_idlg_label(model, digits):
    images, labels = digits
    x, y = images[3:4], labels[3:4]
    target = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    recon = invert_gradient(model, target, (1, 32, 32), iterations=ITERATIONS, seed=1)
    assert recon.shape == (1, 1, 32, 32)
    assert psnr(to_pixels(recon), x) > 30.0


def test_idlg_dlg_without_defence_recovers_labels_and_images(model, digits):
    images, labels = digits
    result = audit(model, images, labels, iterations=ITERATIONS, seed=0)
    assert result.label_accuracy >= 0.95
    assert min(result.psnrs) > 30.0, result.psnrs
    assert result.mean_psnr > 30.0 and result.median_psnr > 30.0
    assert result.reconstructions.shape == images.shape


def test_audit_of_a_model_fed_normalized_inputs(model, digits):
    images, labels = digits
    result = audit(model, images[5:6], labels[5:6], mean=0.3, std=0.4, iterations=ITERATIONS, seed=0)
    assert result.recovered_labels == [5]
    assert result.psnrs[0] > 30.0
    assert result.summary()["baseline_psnr_db"] < 15.0  # a blank gray guess scores far lower


def test_clipping_alone_is_no_defence(model, digits):
    images, labels = digits
    result = audit(model, images[:4], labels[:4], clip_norm=CLIP, iterations=ITERATIONS, seed=0)
    assert result.label_accuracy == 1.0
    assert min(result.psnrs) > 30.0, result.psnrs


def test_dp_noise_defeats_reconstruction(model, digits):
    images, labels = digits
    result = audit(model, images, labels, clip_norm=CLIP, noise_multiplier=0.1, iterations=ITERATIONS, seed=0)
    assert max(result.psnrs) < 20.0, result.psnrs
    assert result.mean_psnr < 20.0
    summary = result.summary()
    assert summary["noise_multiplier"] == 0.1 and summary["clip_norm"] == CLIP


def test_noise_needs_a_clip_norm(model):
    with pytest.raises(ConfigError):
        client_payload(model, torch.rand(1, 32, 32), 0, noise_multiplier=1.0)


def test_unknown_init_is_refused(model):
    payload = client_payload(model, torch.rand(1, 32, 32), 0)
    with pytest.raises(ConfigError):
        invert_gradient(model, payload, (1, 32, 32), 0, init="zeros")


@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_writes_png_of_the_expected_size(tmp_path, channels):
    from matplotlib.image import imread

    originals = torch.rand(5, channels, 32, 32)
    recon = torch.rand(5, channels, 32, 32)
    path = save_grid(originals, recon, tmp_path / "sub" / "grid.png", scale=2, pad=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[:2] == (2 * 64 + 3 * 3, 5 * 64 + 6 * 3)
    top = grid_image(originals, recon, scale=2, pad=3)
    assert top.shape[:2] == pixels.shape[:2]
    # originals sit in the top row, reconstructions below
    assert pixels[3, 3, 0] == pytest.approx(float(originals[0, 0, 0, 0]), abs=1 / 255)
    assert pixels[3 + 64 + 3, 3, 0] == pytest.approx(float(recon[0, 0, 0, 0]), abs=1 / 255)


def test_fedlearn_audit_command_shows_the_defence(tmp_path, capsys) -> None:
    from fedlearn.cli import main

    out = tmp_path / "audit"
    assert main(["audit", "--images", "2", "--compare", "--clip-norm", "4", "--noise-multiplier", "0.1",
                 "--output", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["undefended"]["label_accuracy"] == 1.0 and report["undefended"]["mean_psnr_db"] > 30
    assert report["defended"]["mean_psnr_db"] < 20
    assert (out / "grid_undefended.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "labels recovered" in capsys.readouterr().out


def test_total_variation_is_the_mean_absolute_neighbour_difference():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 3.0]]]])  # rows differ by 3, 2; columns by 1, 0
    assert float(total_variation(x)) == pytest.approx((3 + 2) / 2 + (1 + 0) / 2)
    assert float(total_variation(torch.full((1, 1, 4, 4), 0.7))) == 0.0


def test_the_cosine_attack_reconstructs_an_undefended_and_a_clipped_update(model, digits):
    images, labels = digits
    for clip in (0.0, CLIP):  # the cosine ignores scale: clipping changes nothing for it
        result = audit(model, images[:2], labels[:2], clip_norm=clip, attack="cosine", iterations=200, seed=0)
        baseline = result.summary()["baseline_psnr_db"]
        assert result.label_accuracy == 1.0
        assert min(result.psnrs) > baseline + 8.0, (result.psnrs, baseline)  # far better than a blank guess
        assert result.summary()["attack"] == "cosine" and result.summary()["epsilon"] is None


def test_every_audited_release_reports_its_epsilon(model, digits):
    from fedlearn.privacy.accountant import PrivacyAccountant

    images, labels = digits
    result = audit(model, images[:1], labels[:1], clip_norm=CLIP, noise_multiplier=1.0, iterations=2, seed=0)
    expected = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=1.0, delta=1e-5).epsilon_after(1)
    assert result.summary()["epsilon"] == pytest.approx(expected) == pytest.approx(release_epsilon(1.0))
    assert release_epsilon(0.1) > 50 > release_epsilon(1.0)  # the "defended" z = 0.1 promises little
    with pytest.raises(ConfigError, match="--attack must be one of"):
        audit(model, images[:1], labels[:1], attack="magic")


def test_fedlearn_audit_sweeps_noise_with_epsilon_beside_each_psnr(tmp_path, capsys) -> None:
    from fedlearn.cli import main

    out = tmp_path / "sweep"
    assert main(["audit", "--images", "1", "--iterations", "5", "--clip-norm", "4", "--sweep", "0,1",
                 "--output", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert set(report) == {"z=0", "z=1"} and report["z=0"]["epsilon"] is None
    assert report["z=1"]["epsilon"] == pytest.approx(release_epsilon(1.0))
    assert "epsilon 4.73 for this one release" in capsys.readouterr().out
    assert main(["audit", "--sweep", "0,1", "--output", str(out)]) == 2  # no clip: noise relative to nothing
    assert "--sweep needs" in capsys.readouterr().err
