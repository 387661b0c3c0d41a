"""Worlds: people (or any entities) and their facts, pools, splits, cohorts and versioned
values — pure data: no torch, and nothing from the layers above (rendering, tokens,
models).

A :class:`~factlab.world.people.World` holds the people table (values as codes into
pools), the P_train / P_test split, the unknown people kept out of every document
(hallucination probes), the people who arrive in later experiences (cohorts) and the
values that change from an experience on (updates). How it is written out as text is
the text layer's business; the corpus layer joins the two.
"""

from factlab.world.cohorts import add_cohort
from factlab.world.config import PoolSizes, WorldConfig
from factlab.world.people import ATTRIBUTES, PRONOUNS, Table, World
from factlab.world.sample import make_world
from factlab.world.versions import Updates, update_facts

__all__ = ["ATTRIBUTES", "PRONOUNS", "PoolSizes", "Table", "Updates", "World", "WorldConfig",
           "add_cohort", "make_world", "update_facts"]
