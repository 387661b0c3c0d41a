"""Worlds: people (or any entities) and their facts, pools, splits — pure data, no torch.

A :class:`~factlab.world.people.World` is what every later stage reads: the people table,
the P_train / P_test split, the unknown people kept out of every document (hallucination
probes), the templates it renders with, and the config that made it.
"""

from factlab.world.config import WorldConfig
from factlab.world.people import ATTRIBUTES, Table, World
from factlab.world.sample import make_world

__all__ = ["ATTRIBUTES", "Table", "World", "WorldConfig", "make_world"]
