"""Timestep sampling distributions match their formulas (moments); LR schedules match diffusers' at chosen steps."""

import math

import pytest
import torch
from diffusers.optimization import get_scheduler

from musubi_tuner.errors import UserError
from musubi_tuner.qwen_image.sampler import dynamic_mu
from musubi_tuner.training.optim import build_optimizer, build_scheduler, warmup_steps
from musubi_tuner.training.timesteps import loss_weight, sample_t

N = 200_000


def normal_expectation(fn, mean=0.0, std=1.0):
    """E[fn(X)], X ~ N(mean, std), by quadrature."""
    x = torch.linspace(-10, 10, 400_001, dtype=torch.float64)
    pdf = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(fn(mean + std * x) * pdf, x))


def moments(method, **kw):
    t = sample_t(method, N, torch.Generator().manual_seed(0), **kw).double()
    return t.mean().item(), t.var().item(), t


def check(method, fn, mean=0.0, std=1.0, **kw):
    m, v, t = moments(method, **kw)
    em = normal_expectation(fn, mean, std)
    ev = normal_expectation(lambda x: fn(x) ** 2, mean, std) - em**2
    assert abs(m - em) < 4e-3 and abs(v - ev) < 4e-3, (method, m, em, v, ev)
    assert t.min() >= 0 and t.max() <= 1


def test_uniform():
    m, v, _ = moments("uniform")
    assert abs(m - 0.5) < 3e-3 and abs(v - 1 / 12) < 2e-3


def test_sigmoid_and_scale():
    check("sigmoid", torch.sigmoid)
    check("sigmoid", lambda x: torch.sigmoid(2.0 * x), sigmoid_scale=2.0)


@pytest.mark.parametrize("shift", [1.0, 2.2, 3.0])
def test_shift(shift):
    check("shift", lambda x: shift * torch.sigmoid(x) / (1 + (shift - 1) * torch.sigmoid(x)), shift=shift)


def test_qwen_shift_uses_the_inference_shift_of_the_image_size():
    seq = 64 * 64  # 1024x1024
    mu = dynamic_mu(seq)
    fn = lambda x: math.exp(mu) / (math.exp(mu) + (1 / torch.sigmoid(x) - 1))  # noqa: E731
    check("qwen_shift", fn, image_seq_len=seq)
    assert abs(math.exp(dynamic_mu(83 * 83)) - 2.2) < 0.15  # "about 2.2 for 1328x1328"


def test_logsnr():
    check("logsnr", lambda x: torch.sigmoid(-x / 2), mean=-0.5, std=1.5, logit_mean=-0.5, logit_std=1.5)


def test_sigma_logit_normal_follows_shifted_discrete_sigmas():
    s = 3.0
    fn = lambda x: s * (1 - torch.floor(torch.sigmoid(x) * 1000) / 1000) / (1 + (s - 1) * (1 - torch.floor(torch.sigmoid(x) * 1000) / 1000))  # noqa: E731,E501
    check("sigma", fn, shift=s, weighting_scheme="logit_normal")


def test_min_max_timestep_and_weighting():
    _, _, t = moments("uniform", min_timestep=200, max_timestep=600)
    assert t.min() >= 0.2 and t.max() <= 0.6 and abs(t.mean() - 0.4) < 3e-3
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(loss_weight("sigma_sqrt", t), t ** -2.0)
    assert torch.allclose(loss_weight("cosmap", t), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    assert torch.equal(loss_weight("none", t), torch.ones(3))


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name,kw", [("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
                                     ("cosine_with_restarts", {"num_cycles": 3})])
def test_lr_schedules_match_diffusers(name, kw):
    total, warm, lr = 50, 7, 1e-3
    p = [torch.nn.Parameter(torch.zeros(1))]
    ours = build_scheduler(torch.optim.SGD(p, lr=lr), name, total, warm, kw.get("num_cycles", 1.0))
    ref = get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), num_warmup_steps=warm,
                        num_training_steps=total, **kw)
    a, b = _lrs(ours, total), _lrs(ref, total)
    for step in (0, 3, 7, 8, 20, 33, 49):
        assert abs(a[step] - b[step]) < 1e-12, (name, step, a[step], b[step])


def test_polynomial_min_lr_ratio_and_fraction_warmup():
    p = [torch.nn.Parameter(torch.zeros(1))]
    s = build_scheduler(torch.optim.SGD(p, lr=1.0), "polynomial", 100, 0.1, power=2.0)
    lrs = _lrs(s, 100)
    assert warmup_steps(0.1, 100) == 10 and lrs[5] == 0.5 and lrs[10] == 1.0
    assert abs(lrs[55] - (1 - 45 / 90) ** 2) < 1e-12
    s = build_scheduler(torch.optim.SGD(p, lr=1.0), "cosine", 100, 0, min_lr_ratio=0.1)
    lrs = _lrs(s, 101)
    assert abs(lrs[100] - 0.1) < 1e-12 and abs(lrs[50] - (0.1 + 0.9 * 0.5)) < 1e-12


def test_optimizer_factory():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer("adamw", p, 1e-3, ["weight_decay=0.1", "betas=(0.9,0.95)"]), torch.optim.AdamW)
    ada = build_optimizer("adafactor", p, 1e-3, ["relative_step=False"])
    assert type(ada).__name__ == "Adafactor"
    assert isinstance(build_optimizer("torch.optim.SGD", p, 1e-3, ["momentum=0.9"]), torch.optim.SGD)
    with pytest.raises(UserError, match="--optimizer_args"):
        build_optimizer("adamw", p, 1e-3, ["nonsense=1"])
    with pytest.raises(UserError, match="cannot import"):
        build_optimizer("nope.Opt", p, 1e-3)
