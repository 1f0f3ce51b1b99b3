"""Small training tasks the benchmark scripts in this folder share."""
import torch
from torch import nn


def teacher_student(make_optimizer, seed, steps, warmup=0, clip=None):
    """A 3-layer MLP student fits a fixed random teacher (regression); fresh inputs every step.

    ``make_optimizer(student)`` builds the optimizer; ``warmup`` steps of linear
    learning-rate warm-up and gradient clipping at ``clip`` are optional.
    Returns the per-step training losses and the trained student.
    """
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 32))
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32))
    opt = make_optimizer(student)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup)) if warmup else None
    gen = torch.Generator().manual_seed(seed + 99)
    losses = []
    for _ in range(steps):
        x = torch.randn(128, 64, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(student.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses, student
