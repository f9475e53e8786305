"""cdlab.models.EpsModel on a toy network: CFG is one batched call of 2B (uncond first), NFE counting, the
timestep forms, and the prediction types' conversion to eps (exact on the VP process)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cdlab.math import alpha_sigma, cfg_eps, q_sample
from cdlab.models import EpsModel


class _Net:
    """out = x * (1 + emb.mean) + t / 1000, recording each call's batch and timesteps."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, encoder_hidden_states):
        self.calls.append((x.shape[0], t))
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=x * (1 + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)) + tt / 1000)


class _Sched:
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


def _inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 6, generator=g), torch.randn(b, 5, 6, generator=g)


def test_cfg_is_one_batched_call_uncond_first_and_counts_two():
    x, c, u = _inputs()
    net = _Net()
    w = torch.tensor([1.0, 3.0, 7.5])
    model = EpsModel(net, w)
    eps = model(x, 500, c, u)
    assert [b for b, _ in net.calls] == [6] and model.nfe == 2
    assert torch.equal(net.calls[0][1], torch.full((6,), 500))
    ref = cfg_eps(_Net()(x, torch.full((3,), 500), u).sample, _Net()(x, torch.full((3,), 500), c).sample, w)
    assert torch.equal(eps, ref)
    # no uncond, or w == 1: the conditional network alone, 1 NFE
    for m, args in ((EpsModel(net, 7.5), (x, 500, c)), (EpsModel(net, 1.0), (x, 500, c, u)),
                    (EpsModel(net), (x, torch.full((3,), 500), c, u))):
        n = len(net.calls)
        m(*args)
        assert net.calls[n][0] == 3 and m.nfe == 1
    # the losses' teachers guide at w == 1 too (eps_u + 1 (eps_c - eps_u)), with [B] timesteps repeated
    t = torch.tensor([10, 20, 30])
    m = EpsModel(net, torch.ones(3), guide_at_one=True)
    m(x, t, c, u)
    assert net.calls[-1][0] == 6 and torch.equal(net.calls[-1][1], torch.cat([t, t])) and m.nfe == 2


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_convert_exactly_to_eps(prediction_type):
    x0, _, _ = _inputs()
    eps = torch.randn_like(x0)
    t = torch.tensor([50, 500, 950])
    x_t = q_sample(x0, t, _Sched(), noise=eps)
    a, s = alpha_sigma(t, _Sched(), x_t)
    target = a * eps - s * x0 if prediction_type == "v_prediction" else x0

    class Oracle:
        def __call__(self, x, tt, encoder_hidden_states):
            return SimpleNamespace(sample=target)

    model = EpsModel(Oracle(), prediction_type=prediction_type, scheduler=_Sched())
    got = model(x_t, t, torch.zeros(3, 1, 1))
    torch.testing.assert_close(got, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.to_x0(got, x_t, t), x0, rtol=1e-4, atol=1e-4)


def test_clear_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        EpsModel(_Net(), prediction_type="flow")
    with pytest.raises(ValueError, match="scheduler"):
        EpsModel(_Net(), prediction_type="v_prediction")
