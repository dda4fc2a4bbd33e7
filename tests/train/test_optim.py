"""Decoupled LionW (MosaicML semantics) and the warmup + cosine schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rasa_lora.train.optim import DecoupledLionW, build_scheduler, warmup_schedule


def test_lion_step_matches_the_update_rule_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = DecoupledLionW([param], lr=0.1, betas=(0.9, 0.95))
    optimizer.state[param]["exp_avg"] = torch.tensor([1.0, 1.0, -1.0])
    param.grad = torch.tensor([-20.0, 3.0, 0.5])
    optimizer.step()
    # direction = sign(0.9 * m + 0.1 * g) = sign([-1.1, 1.2, -0.85]) = [-1, 1, -1]
    assert torch.allclose(param.detach(), torch.tensor([1.1, -2.1, 0.6]))
    # momentum = 0.95 * m + 0.05 * g
    assert torch.allclose(optimizer.state[param]["exp_avg"], torch.tensor([-0.05, 1.1, -0.925]))


def test_weight_decay_follows_the_schedule_not_the_lr_itself():
    param = torch.nn.Parameter(torch.tensor([2.0]))
    optimizer = DecoupledLionW([param], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer.param_groups[0]["lr"] = 5e-4  # the schedule has halved the lr
    param.grad = torch.tensor([0.0])
    optimizer.step()
    # p * (1 - wd * lr / initial_lr) - lr * sign(0) = 2 * (1 - 0.1 * 0.5)
    assert param.item() == pytest.approx(1.9)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    values = [warmup_schedule(step, total_steps=20, warmup_steps=2) for step in range(21)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert values[20] == pytest.approx(0.0)


def test_scheduler_uses_ten_percent_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, 50, SimpleNamespace(warmup_ratio=0.1, lr_scheduler="cosine"))
    lrs = []
    for _ in range(50):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs.index(max(lrs)) == 5 and lrs[5] == 1.0


def test_lionw_matches_lion_pytorch_decoupled_mode_step_for_step():
    """An outside oracle: lion-pytorch's `Lion(decoupled_weight_decay=True)` decays by `1 - lr * wd / initial_lr`,
    MosaicML's semantics; 30 steps with a warmup-cosine schedule and weight decay give the same parameters."""
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="optional oracle: pip install --no-deps lion-pytorch")
    config = SimpleNamespace(warmup_ratio=0.1, lr_scheduler="cosine")
    start = torch.randn(2, 17, 13, generator=torch.Generator().manual_seed(0))
    params = [torch.nn.Parameter(start[0].clone()), torch.nn.Parameter(start[0].clone())]
    ours = DecoupledLionW([params[0]], lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = lion_pytorch.Lion([params[1]], lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1,
                               decoupled_weight_decay=True)
    schedulers = [build_scheduler(optimizer, 30, config) for optimizer in (ours, theirs)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        grad = torch.randn(17, 13, generator=generator)
        for param, optimizer, scheduler in zip(params, (ours, theirs), schedulers):
            param.grad = grad.clone()
            optimizer.step()
            scheduler.step()
    assert not torch.allclose(params[0], start[0], atol=0.1)  # the steps moved the parameters
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-6)
