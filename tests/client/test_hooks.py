"""Every registered hook's step is pure tensor maths: it runs under torch.func.vmap across clients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlearn.client.hooks import HookContext, ParamLayout
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.registry import lookup, names


def _context() -> tuple[HookContext, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    vector = ModelVector(model)
    params = [p.detach().clone() for p in model.parameters()]
    starts = [0]
    for n in vector.spec.numels:
        starts.append(starts[-1] + n)
    layout = ParamLayout(list(vector.spec.names), list(zip(starts[:-1], starts[1:])), [p.shape for p in params],
                         vector.spec.numel)
    arrays = {"weights": vector.read(), "control": torch.randn(vector.spec.numel)}
    task = TrainTask(1, "c0", arrays, LocalConfig().to_dict())
    state = {"control": torch.randn(vector.spec.numel)}
    return HookContext(task, LocalConfig(), state, layout, torch.device("cpu"), params), params


@pytest.mark.parametrize("name", names("hook"))
def test_hook_step_runs_under_vmap_and_matches_the_loop(name):
    hook = lookup("hook", name)()
    ctx, params = _context()
    hook.begin(ctx)
    clients = 3
    stacked_p = [torch.stack([p + 0.1 * i for i in range(clients)]) for p in params]
    stacked_g = [torch.randn(clients, *p.shape) for p in params]
    batched = torch.func.vmap(lambda p, g: hook.grads(ctx, p, g))(stacked_p, stacked_g)
    for i in range(clients):
        one = hook.grads(ctx, [p[i] for p in stacked_p], [g[i] for g in stacked_g])
        for b, o in zip(batched, one):
            torch.testing.assert_close(b[i], o, rtol=0, atol=1e-6)


def test_prox_step_is_the_proximal_gradient():
    hook = lookup("hook", "prox")(lookup("hook", "prox").Config(mu=0.5))
    ctx, params = _context()
    moved = [p + 1.0 for p in params]
    grads = [torch.zeros_like(p) for p in params]
    out = hook.grads(ctx, moved, grads)
    assert all(torch.allclose(o, torch.full_like(o, 0.5)) for o in out)


def test_a_client_policy_keeps_its_order_and_refuses_weaker_requests():
    from fedlearn.client.app import ClientPolicy, TaskRefused
    from fedlearn.transforms import Clip, GaussianNoise

    policy = ClientPolicy([Clip(Clip.Config(1.0)), GaussianNoise(GaussianNoise.Config(0.5))])
    # a server asking only for (stronger) noise still gets clip first, then its noise
    out = policy.pipeline([GaussianNoise(GaussianNoise.Config(0.8))])
    assert [t.name for t in out] == ["clip", "gaussian"] and out[1].config.std == 0.8
    assert [t.name for t in policy.pipeline([])] == ["clip", "gaussian"]
    with pytest.raises(TaskRefused, match="weaker"):
        policy.pipeline([GaussianNoise(GaussianNoise.Config(0.0))])
    with pytest.raises(TaskRefused, match="weaker"):
        policy.pipeline([Clip(Clip.Config(10.0))])
