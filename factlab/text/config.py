"""How a world is written out as text: augmentation, style, templates, bioR knobs.

Kept apart from :class:`factlab.world.config.WorldConfig` (who the people are and what is
true of them) so that the world stays pure data; changing any key here changes the
documents, never the people or their codes.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from factlab.config import Strict

STYLES = ("bioS", "bioR")


class BioRConfig(Strict):
    """Knobs of the bioR-like template grammar (``style: bioR``)."""

    opener_prob: float = Field(0.5, ge=0, le=1)
    pair_prob: float = Field(0.4, ge=0, le=1)  # chance an eligible adjacent pair shares a sentence
    partial_name_prob: float = Field(0.35, ge=0, le=1)  # later mentions: "Ms. Forger" / "Anya"
    max_fillers: int = Field(2, ge=0, le=10)


def check_style(v: str) -> str:
    if v not in STYLES:
        raise ValueError("must be 'bioS' or 'bioR'")
    return v


class RenderConfig(Strict):
    augment: str = "single"
    style: str = "bioS"  # bioS (template sentences) | bioR (richer template grammar)
    minority_augment: str = "single+permute1"  # celebrity worlds: the minority's augmentation
    templates: str | None = None  # YAML of per-attribute sentence / question templates
    bior: BioRConfig = BioRConfig()

    @field_validator("style")
    @classmethod
    def _style(cls, v: str) -> str:
        return check_style(v)
