import numpy as np
import pytest

from factlab.corpus import CorpusConfig, make_corpus


@pytest.fixture(scope="session")
def world_small():
    """300 people, single bios, he/she/they all present."""
    return make_corpus(CorpusConfig(people=300, seed=3, unknown=40, they_fraction=0.3))


def make(**kw):
    kw.setdefault("seed", 1)
    kw.setdefault("unknown", 10)
    return make_corpus(CorpusConfig(**kw))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def cli(*args):
    """Run the ``factlab`` CLI in-process; return the exit code."""
    import sys

    from factlab.cli import main

    old = sys.argv
    sys.argv = ["factlab", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
    return 0
