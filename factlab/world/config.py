"""The config that makes a world's data (validated; unknown keys are errors).

Only what decides *who* the people are and *what* is true of them lives here. How a world
is written out as text (augmentation, style, templates) belongs to the rendering config of
the text layer above; the flat ``world:`` block of a recipe, which holds both, belongs to
the corpus layer above that. Nothing here knows either.
"""

from __future__ import annotations

from pydantic import Field

from factlab.config import Strict


class PoolSizes(Strict):
    """How much of each shipped pool to use (a prefix of it). Defaults are the paper's."""

    first: int = 400
    middle: int = 400
    last: int = 1000
    cities: int = 200
    universities: int = 300
    majors: int = 100
    companies: int = 263
    years: tuple[int, int] = (1900, 2099)


class WorldConfig(Strict):
    people: int = Field(1000, ge=2, description="number of people who get bios")
    seed: int = 0
    test_fraction: float = Field(0.5, gt=0, lt=1)  # share of people in P_test
    unknown: int = Field(100, ge=0)  # people sampled from the pools but never rendered
    they_fraction: float = Field(0.0, ge=0, le=1)  # share of people referred to as "they"
    # celebrity world (spec §3): `people` celebrities plus `minority` people, each group
    # rendered with its own augmentation; QA trains on celebrities only.
    minority: int = Field(0, ge=0)
    facts: str | None = None  # user fact file (JSONL / CSV); replaces the sampled people
    pools: PoolSizes = PoolSizes()
