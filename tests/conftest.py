import numpy as np
import pytest

from factlab.world import WorldConfig, make_world


@pytest.fixture(scope="session")
def world_small():
    """300 people, single bios, he/she/they all present."""
    return make_world(WorldConfig(people=300, seed=3, unknown=40, they_fraction=0.3))


def make(**kw):
    kw.setdefault("seed", 1)
    kw.setdefault("unknown", 10)
    return make_world(WorldConfig(**kw))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
