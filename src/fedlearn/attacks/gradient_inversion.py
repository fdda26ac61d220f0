"""Gradient inversion: iDLG's analytic label recovery and DLG's input reconstruction from a FedSGD gradient.

Zhu et al. 2019 (DLG) optimise a dummy input until its gradient matches the observed one in L2,
with L-BFGS; Zhao et al. 2020 (iDLG) first read the label off the last layer's gradient, so only
the input is optimised. Both assume the gradient of *one* example under cross-entropy: for a
batch, the last layer's rows mix the examples and the label trick no longer applies, so the
audit attacks one example per FedSGD update (the worst case for the client, and the usual audit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedlearn.errors import ConfigError, InvalidUpdateError, ModelError
from fedlearn.protocol.params import ParamSpec, check_vector

INITS = ("uniform", "gray", "normal")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's (name, parameter) pairs that receive gradients, in ``model.parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gradients_from_vector(model: nn.Module, vector: torch.Tensor) -> list[torch.Tensor]:
    """Split a flat gradient-mode payload (over the model's ParamSpec) into one tensor per trainable parameter.

    The payload also carries floating buffers (zeros in gradient mode); they are dropped here.
    """
    spec = ParamSpec.from_module(model)
    check_vector(vector, spec)
    named = spec.unflatten(vector.detach().to("cpu", torch.float32))
    params = trainable_parameters(model)
    missing = [n for n, _ in params if n not in named]
    if missing:
        raise ModelError(f"the payload's spec lacks parameters {missing[:3]}; give the attack the client's model")
    return [named[n].to(p.device, p.dtype) for n, p in params]


def as_gradient_list(model: nn.Module, target_grad: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Accept a flat payload vector or a list of per-parameter tensors; return detached per-parameter tensors."""
    params = trainable_parameters(model)
    if isinstance(target_grad, torch.Tensor):
        return gradients_from_vector(model, target_grad)
    grads = [g.detach() for g in target_grad]
    if len(grads) != len(params) or any(g.shape != p.shape for g, (_, p) in zip(grads, params)):
        raise InvalidUpdateError(
            f"got {len(grads)} gradient tensors but the model has {len(params)} trainable parameters of other shapes; "
            "pass the flat payload or one tensor per parameter in model.parameters() order"
        )
    return [g.to(p.device, p.dtype) for g, (_, p) in zip(grads, params)]


def last_layer_index(model: nn.Module) -> int:
    """Index, among trainable parameters, of the weight of the model's last ``nn.Linear`` (the classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("iDLG label recovery needs a final nn.Linear classifier; pass the label explicitly instead")
    weight = linears[-1].weight
    for i, (_, p) in enumerate(trainable_parameters(model)):
        if p is weight:
            return i
    raise ModelError("the last nn.Linear's weight is frozen; pass the label explicitly instead")


def idlg_label(grad_last_weight: torch.Tensor) -> int:
    """iDLG: the label is the row of the last FC weight's gradient with negative entries (lowest row sum).

    For one example under cross-entropy, row i is (softmax_i - onehot_i) * h, where h is the input
    of the last layer. With non-negative h (after a sigmoid or ReLU) only the true class's row is
    negative, so the argmin of the row sums is the label; summing the row makes it robust to noise.
    """
    if grad_last_weight.dim() != 2:
        raise ValueError(f"expected the (classes, features) weight gradient, got shape {tuple(grad_last_weight.shape)}")
    return int(grad_last_weight.detach().to(torch.float64).sum(dim=1).argmin())


def recover_label(model: nn.Module, target_grad: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Apply ``idlg_label`` to the gradient of the model's last linear layer."""
    grads = as_gradient_list(model, target_grad)
    return idlg_label(grads[last_layer_index(model)])


def _dummy(shape: tuple[int, ...], init: str, generator: torch.Generator, mean: float | Sequence[float] | None,
           std: float | Sequence[float] | None) -> torch.Tensor:
    """The starting input: noise or mid-gray in [0, 1] pixels, normalized like the model's inputs."""
    if init == "uniform":
        x = torch.rand(shape, generator=generator)
    elif init == "gray":
        x = torch.full(shape, 0.5)
    elif init == "normal":
        return torch.randn(shape, generator=generator)  # DLG's code: N(0, 1) directly in input space
    else:
        raise ConfigError(f"unknown dummy init {init!r}; use one of {', '.join(INITS)}")
    return _model_space(x, mean, std)


def _model_space(x: torch.Tensor, mean: float | Sequence[float] | None,
                 std: float | Sequence[float] | None) -> torch.Tensor:
    """[0, 1] pixels normalized like the model's inputs (identity when both are None)."""
    if mean is None and std is None:
        return x
    view = (1, -1, 1, 1) if x.dim() == 4 else (-1,) + (1,) * (x.dim() - 1)
    m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32).reshape(view)
    s = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32).reshape(view)
    return (x - m) / s


def _attack_setup(model: nn.Module, target_grad: torch.Tensor | Sequence[torch.Tensor], input_shape: Sequence[int],
                  label: int | None, *, iterations: int, seed: int, init: str, mean: float | Sequence[float] | None,
                  std: float | Sequence[float] | None) -> tuple[list[torch.Tensor], list[nn.Parameter], torch.Tensor,
                                                                torch.Tensor]:
    """(target gradients, trainable parameters, the dummy input to optimize, its label tensor) of an attack."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    target = as_gradient_list(model, target_grad)
    if label is None:
        label = idlg_label(target[last_layer_index(model)])
    params = [p for _, p in trainable_parameters(model)]
    device = params[0].device
    generator = torch.Generator().manual_seed(seed)
    dummy = _dummy((1, *input_shape), init, generator, mean, std).to(device).requires_grad_(True)
    return target, params, dummy, torch.tensor([label], device=device)


def _dummy_gradients(model: nn.Module, dummy: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter],
                     clip_norm: float | None) -> list[torch.Tensor]:
    """The dummy's parameter gradients (differentiable), clipped as the client clips (the attacker knows C)."""
    grads = torch.autograd.grad(F.cross_entropy(model(dummy), y), params, create_graph=True)
    if clip_norm is not None and clip_norm > 0:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        grads = [g * torch.clamp(clip_norm / (norm + 1e-12), max=1.0) for g in grads]
    return list(grads)


def invert_gradient(
    model: nn.Module,
    target_grad: torch.Tensor | Sequence[torch.Tensor],
    input_shape: Sequence[int],
    label: int | None = None,
    *,
    iterations: int = 100,
    lr: float = 1.0,
    seed: int = 0,
    init: str = "uniform",
    clip_norm: float | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    history_size: int = 100,
) -> torch.Tensor:
    """DLG with a known (iDLG) label: L-BFGS on sum_layers ||grad(dummy) - target||^2; returns (1, *input_shape).

    ``target_grad`` is a flat gradient-mode payload over the model's ParamSpec or one tensor per
    trainable parameter. ``label=None`` recovers it with iDLG. ``clip_norm`` replays the client's
    L2 clipping on the dummy gradient (the attacker knows C from the task config), so clipping
    alone does not hide the input. ``mean``/``std`` only map the [0, 1] dummy start into the
    model's input space; the result is in that space too. The lowest-distance input seen is returned.
    """
    target, params, dummy, y = _attack_setup(model, target_grad, input_shape, label, iterations=iterations,
                                             seed=seed, init=init, mean=mean, std=std)
    optimizer = torch.optim.LBFGS(
        [dummy], lr=lr, max_iter=iterations, max_eval=int(iterations * 1.25), history_size=history_size,
        tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
    )
    best = (float("inf"), dummy.detach().clone())

    def closure() -> torch.Tensor:
        nonlocal best
        grads = _dummy_gradients(model, dummy, y, params, clip_norm)
        distance = sum(((g - t) ** 2).sum() for g, t in zip(grads, target))
        dummy.grad = torch.autograd.grad(distance, dummy)[0]
        value = float(distance.detach())
        if value < best[0]:
            best = (value, dummy.detach().clone())
        return distance.detach()

    optimizer.step(closure)
    return best[1]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images (N, C, H, W): mean absolute difference of neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_gradient_cosine(
    model: nn.Module,
    target_grad: torch.Tensor | Sequence[torch.Tensor],
    input_shape: Sequence[int],
    label: int | None = None,
    *,
    iterations: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-2,
    seed: int = 0,
    init: str = "uniform",
    clip_norm: float | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Geiping et al. (NeurIPS 2020): Adam on 1 - cos(grad(dummy), target) + ``tv_weight`` * TV(dummy), signed
    gradient steps, the dummy kept inside the image's pixel range. The cosine ignores the update's scale, so clipping
    and isotropic noise hurt it less than DLG's distance; the prior favours natural images. Returns (1, *shape).
    """
    target, params, dummy, y = _attack_setup(model, target_grad, input_shape, label, iterations=iterations,
                                             seed=seed, init=init, mean=mean, std=std)
    low = _model_space(torch.zeros((1, *input_shape)), mean, std).to(dummy.device)
    high = _model_space(torch.ones((1, *input_shape)), mean, std).to(dummy.device)
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))
    optimizer = torch.optim.Adam([dummy], lr=lr)
    best = (float("inf"), dummy.detach().clone())
    for _ in range(iterations):
        grads = _dummy_gradients(model, dummy, y, params, clip_norm)
        dot = sum((g * t).sum() for g, t in zip(grads, target))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        loss = 1 - dot / (norm * target_norm + 1e-12) + tv_weight * total_variation(dummy)
        value = float(loss.detach())
        if value < best[0]:
            best = (value, dummy.detach().clone())
        optimizer.zero_grad(set_to_none=True)
        dummy.grad = torch.autograd.grad(loss, dummy)[0].sign()
        optimizer.step()
        with torch.no_grad():
            dummy.copy_(torch.maximum(torch.minimum(dummy, high), low))
    return best[1]
