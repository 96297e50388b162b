"""AMICL's associative-memory readout (eval/amicl.py) against the official notebook's regime."""

import numpy as np
import pytest

from experiments.amicl.run import simulate


def test_amicl_accuracy_rises_with_the_mixing_amplitude():
    rng = np.random.default_rng(0)
    high = simulate(100, 512, 20, 2.0, 300, rng) / 300
    mid = simulate(100, 512, 20, 1.25, 300, rng) / 300
    tie = simulate(100, 512, 20, 1.0, 300, rng) / 300
    assert high >= 0.99  # notebook: 1000/1000
    assert mid == pytest.approx(0.907, abs=0.06)  # notebook: 907/1000
    assert tie == pytest.approx(0.325, abs=0.09)  # notebook: 325/1000
    assert simulate(100, 512, 20, 0.0, 200, rng) == 0  # the query (a * 0 + 0) is zero: no key stands out


def test_amicl_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even"):
        simulate(10, 8, 7, 1.0, 1, np.random.default_rng(0))
