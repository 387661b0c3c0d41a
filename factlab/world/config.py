"""The config that makes a world (validated; unknown keys are errors)."""

from __future__ import annotations

from pydantic import Field, field_validator

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


class BioRConfig(Strict):
    """Knobs of the bioR-like template grammar (``style: bioR``)."""

    opener_prob: float = Field(0.5, ge=0, le=1)
    pair_prob: float = Field(0.4, ge=0, le=1)  # chance an eligible adjacent pair shares a sentence
    partial_name_prob: float = Field(0.35, ge=0, le=1)  # later mentions: "Ms. Forger" / "Anya"
    max_fillers: int = Field(2, ge=0, le=10)


class WorldConfig(Strict):
    people: int = Field(1000, ge=2, description="number of people who get bios")
    seed: int = 0
    augment: str = "single"
    style: str = "bioS"  # bioS (template sentences) | bioR (richer template grammar)
    test_fraction: float = Field(0.5, gt=0, lt=1)  # share of people in P_test
    unknown: int = Field(100, ge=0)  # people sampled from the pools but never rendered
    they_fraction: float = Field(0.0, ge=0, le=1)  # share of people referred to as "they"
    # celebrity world (spec §3): `people` celebrities rendered with `augment`, plus
    # `minority` people rendered with `minority_augment`; QA trains on celebrities only.
    minority: int = Field(0, ge=0)
    minority_augment: str = "single+permute1"
    facts: str | None = None  # user fact file (JSONL / CSV); replaces the sampled people
    templates: str | None = None  # YAML of per-attribute sentence / question templates
    pools: PoolSizes = PoolSizes()
    bior: BioRConfig = BioRConfig()

    @field_validator("style")
    @classmethod
    def _style(cls, v: str) -> str:
        if v not in ("bioS", "bioR"):
            raise ValueError("must be 'bioS' or 'bioR'")
        return v
