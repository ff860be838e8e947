"""The optimiser's rates in train_realnet.py: the schedule over the run and a scale per
parameter group.

The paper trains with one constant rate (Adam, 1e-4, 1000 epochs). At demo scale two
departures help a short run: a cosine decay to 0 (a stabler last step) and a larger rate for
the discriminator (`--discriminator-lr-scale`). The discriminator starts from nothing
against reconstruction targets the UNets reach early, and in a short decayed run its rate
fades before it has learned what the residuals already show: on granite the raw level-1
residual separated held-out synthetic anomalies better than the trained discriminator.
"""

import math


def parameter_groups(model, discriminator_lr_scale):
    """Adam's parameter groups: the reconstruction UNets at the rate, the discriminator at
    `discriminator_lr_scale` times it (each group's "lr_scale", applied by train_step)."""
    head = list(model.discriminator.parameters())
    in_head = {id(p) for p in head}
    return [
        {"params": [p for p in model.parameters() if id(p) not in in_head], "lr_scale": 1.0},
        {"params": head, "lr_scale": discriminator_lr_scale},
    ]


def set_learning_rate(optimizer, lr):
    """The step's rate on every parameter group, times the group's scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def learning_rate(lr, schedule, step, total_steps):
    """The rate for optimiser step `step` (0-based): constant, or cosine from lr down to 0.
    A pure function of the step, so a resumed run needs no scheduler state."""
    if schedule == "constant" or total_steps <= 0:
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * step / total_steps))
