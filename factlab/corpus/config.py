"""The flat ``world:`` block of a recipe (and the options of ``factlab world make``): a
world's data config and its render config in one, split when used.

Users write one block (``world: {people: 400, augment: multi5+permute, pools: ...}``);
the world is made from :meth:`CorpusConfig.world_config` and rendered with
:meth:`CorpusConfig.render_config`. Each field is the very field of its part (same type,
default and bounds), and the keys keep the order they had before the split, so resolved
recipes read (and compare) as before.
"""

from __future__ import annotations

from pydantic import field_validator

from factlab.config import Strict
from factlab.text.config import BioRConfig, RenderConfig, check_style
from factlab.world.config import PoolSizes, WorldConfig

_W, _R = WorldConfig.model_fields, RenderConfig.model_fields


class CorpusConfig(Strict):
    people: int = _W["people"]
    seed: int = _W["seed"]
    augment: str = _R["augment"]
    style: str = _R["style"]
    test_fraction: float = _W["test_fraction"]
    unknown: int = _W["unknown"]
    they_fraction: float = _W["they_fraction"]
    minority: int = _W["minority"]
    minority_augment: str = _R["minority_augment"]
    facts: str | None = _W["facts"]
    templates: str | None = _R["templates"]
    pools: PoolSizes = _W["pools"]
    bior: BioRConfig = _R["bior"]

    @field_validator("style")
    @classmethod
    def _style(cls, v: str) -> str:
        return check_style(v)

    def world_config(self) -> WorldConfig:
        return WorldConfig(**{k: getattr(self, k) for k in WorldConfig.model_fields})

    def render_config(self) -> RenderConfig:
        return RenderConfig(**{k: getattr(self, k) for k in RenderConfig.model_fields})

    @classmethod
    def join(cls, world: WorldConfig, render: RenderConfig) -> CorpusConfig:
        return cls(**dict(world), **dict(render))
