"""train_realnet.learning_rate: the paper's constant rate and the demo's cosine decay."""

import math

from train_realnet import learning_rate


def test_constant_is_the_paper_rate_at_every_step():
    assert {learning_rate(1e-4, "constant", step, 1000) for step in range(0, 1000, 7)} == {1e-4}


def test_cosine_decays_from_the_rate_to_zero_and_never_rises():
    rates = [learning_rate(1e-3, "cosine", step, 1500) for step in range(1500)]
    assert rates[0] == 1e-3
    assert math.isclose(rates[750], 0.5e-3, rel_tol=1e-12)
    assert 0 < rates[-1] < 1e-8
    assert all(a >= b for a, b in zip(rates, rates[1:]))
