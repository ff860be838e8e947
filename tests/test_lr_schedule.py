"""realnet.rates, train_realnet.py's rates: the paper's constant rate, the demo's cosine decay and
the discriminator's rate scale (--discriminator-lr-scale)."""

import math

from realnet.rates import learning_rate


def test_constant_is_the_paper_rate_at_every_step():
    assert {learning_rate(1e-4, "constant", step, 1000) for step in range(0, 1000, 7)} == {1e-4}


def test_cosine_decays_from_the_rate_to_zero_and_never_rises():
    rates = [learning_rate(1e-3, "cosine", step, 1500) for step in range(1500)]
    assert rates[0] == 1e-3
    assert math.isclose(rates[750], 0.5e-3, rel_tol=1e-12)
    assert 0 < rates[-1] < 1e-8
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_discriminator_rate_scale_reaches_only_the_discriminator():
    import torch
    from test_model import fake_afs

    from realnet.model import RealNet, build_config
    from realnet.rates import parameter_groups, set_learning_rate

    model = RealNet(build_config(fake_afs()))
    unets, head = parameter_groups(model, 3.0)
    assert [id(p) for p in head["params"]] == [id(p) for p in model.discriminator.parameters()]
    everything = unets["params"] + head["params"]
    assert sorted(map(id, everything)) == sorted(map(id, model.parameters()))  # each once
    # one step of Adam moves a parameter by about the rate: the discriminator three times as far
    optimizer = torch.optim.Adam(parameter_groups(model, 3.0), lr=1.0)
    before = [p.detach().clone() for p in everything]
    for p in everything:
        p.grad = torch.ones_like(p)
    set_learning_rate(optimizer, 1e-3)  # what train_step does before each Adam step
    optimizer.step()
    moved = [(p - b).abs().max().item() for p, b in zip(everything, before)]
    n = len(unets["params"])
    assert all(math.isclose(m, 1e-3, rel_tol=1e-3) for m in moved[:n])
    assert all(math.isclose(m, 3e-3, rel_tol=1e-3) for m in moved[n:])
