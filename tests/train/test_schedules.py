import math

import pytest
import torch

from omnissl.train.schedules import TriStage, WarmupCosine, WarmupPolynomial


def _lrs(make, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, sched, opt


def test_warmup_cosine_values():
    lrs, _, _ = _lrs(lambda o: WarmupCosine(o, warmup_steps=10, total_steps=110, final_scale=0.1), 120)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_warmup_polynomial_values():
    lrs, _, _ = _lrs(lambda o: WarmupPolynomial(o, warmup_steps=4, total_steps=14, power=2.0), 16)
    assert lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.5**2) and lrs[14] == 0.0 and lrs[15] == 0.0


def test_tri_stage_values():
    lrs, _, _ = _lrs(lambda o: TriStage(o, total_steps=100, phase_ratio=(0.1, 0.4, 0.5), init_scale=0.01,
                                         final_scale=0.05), 105)
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(1.0) and lrs[49] == pytest.approx(1.0)
    assert lrs[75] == pytest.approx(math.exp(math.log(0.05) * 0.5))
    assert lrs[100] == pytest.approx(0.05) and lrs[104] == pytest.approx(0.05)


def test_schedule_resumes_from_state_dict():
    make = lambda o: WarmupCosine(o, warmup_steps=10, total_steps=100)  # noqa: E731
    lrs, sched, _ = _lrs(make, 30)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = make(opt2)
    s2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = s2.get_lr()[0]
    ref, _, _ = _lrs(make, 31)
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref[30])


def test_bad_schedule_config_fails():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(opt, warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="sum to 1"):
        TriStage(opt, total_steps=10, phase_ratio=(0.5, 0.5, 0.5))
