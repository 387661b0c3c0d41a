"""Part 3.3's bits of knowledge (issue 16 §5): the formula against hand-computed cases."""

import math

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.evaluate.capacity import bits_per_parameter, bits_stored

POOLS = {"birth_city": 200, "university": 300, "company_city": 1}


def test_a_certain_model_stores_the_worlds_entropy_and_one_at_chance_stores_zero():
    n = 50
    certain = bits_stored({a: np.zeros(n) for a in POOLS}, POOLS)
    entropy = n * (math.log2(200) + math.log2(300))  # the derived city adds nothing
    assert certain["bits"] == pytest.approx(entropy) == certain["entropy_bits"]
    assert certain["fraction"] == pytest.approx(1.0)
    chance = bits_stored({a: np.full(n, math.log(d)) for a, d in POOLS.items()}, POOLS)
    assert chance["bits"] == pytest.approx(0.0, abs=1e-9)
    worse = bits_stored({"birth_city": np.full(n, 2 * math.log(200))}, POOLS)
    assert worse["bits"] == 0.0  # worse than chance counts as nothing, not negative


def test_a_hand_computed_case():
    # 2 people, 4 values: one value known (0 nats), one at 1 bit of loss (ln 2 nats):
    # 2 x 2 bits of entropy - 1 bit not known = 3 bits
    r = bits_stored({"a": np.array([0.0, math.log(2)])}, {"a": 4})
    assert r["bits"] == pytest.approx(3.0) and r["attributes"]["a"]["entropy_bits"] == 4.0
    assert bits_per_parameter(r["bits"], 3) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(FactlabError, match="no pool size"):
        bits_stored({"x": np.zeros(2)}, {})
    with pytest.raises(FactlabError, match="finite and >= 0"):
        bits_stored({"a": np.array([np.nan])}, {"a": 4})
    with pytest.raises(FactlabError, match="pool size 0"):
        bits_stored({"a": np.zeros(1)}, {"a": 0})
    with pytest.raises(FactlabError, match="parameters must be >= 1"):
        bits_per_parameter(1.0, 0)
