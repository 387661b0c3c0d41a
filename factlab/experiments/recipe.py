"""Recipe schema. A recipe is plain YAML: shared settings plus a list of cells; each cell
overrides any shared key (deep merge), e.g. its augmentation or regime."""

from __future__ import annotations

from importlib import resources
from itertools import accumulate
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from factlab.config import Strict, build, deep_merge, load_yaml, parse_overrides
from factlab.errors import FactlabError
from factlab.memory.run import MemorySettings
from factlab.probe.config import ProbeStep
from factlab.train.config import TrainConfig
from factlab.corpus.config import CorpusConfig


class TokenizerConfig(Strict):
    vocab_size: int = Field(4096, ge=300)
    path: str | None = None  # a local HF tokenizer directory instead of training one


class ModelConfig(Strict):
    arch: str = "gpt2-rope"  # gpt2-rope | llama
    # tiny | small | gpt2-small | gpt2-302m, or {layers, heads, width[, intermediate]}
    size: str | dict[str, int] = "small"
    context: int = Field(128, ge=16)
    # a local model directory instead of a fresh model: HF, peft adapter or factlab
    # wrapper (factlab.model.load.load_any); `factlab model import` makes one from a GGUF
    path: str | None = None
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the weights of a loaded model
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    # how questions and answers become text: the world's "{question}\nAnswer:" (plain) or
    # the tokenizer's chat template (chat: for instruct models), in training and evaluation
    prompt_format: str = "plain"
    threads: int = Field(0, ge=0)  # torch threads per cell process (0: torch default)

    @field_validator("prompt_format")
    @classmethod
    def _prompt_format(cls, v):
        if v not in ("plain", "chat"):
            raise ValueError("must be 'plain' or 'chat'")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in ("fp32", "bf16", "fp16"):
            raise ValueError("must be 'fp32', 'bf16' or 'fp16'")
        return v


class FinetuneConfig(TrainConfig):
    mode: str = "lora"  # lora | full
    lora_r: int = Field(8, ge=1)
    lora_r_embed: int = Field(128, ge=0)
    # QA finetuning: one question per sequence (True: pack several per sequence; mixed
    # training has no finetune stage and always packs its QA sequences) -- see QAStream
    pack_qa: bool = False

    @field_validator("mode")
    @classmethod
    def _mode(cls, v):
        if v not in ("lora", "full"):
            raise ValueError("must be 'lora' or 'full'")
        return v


class EvalConfig(Strict):
    batch_size: int = Field(64, ge=1)
    num_beams: int = Field(1, ge=1)
    max_people: int | None = Field(None, ge=1)  # cap people per split in QA evaluation
    first_token_people: int = Field(100, ge=1)  # people per split for first-token curves


class MemoryStep(MemorySettings):
    """The optional ``memory`` step of a recipe cell: ``facts`` new facts about names new to
    the cell's world, stored in a memory bank on the cell's trained model (frozen) and
    measured as ``factlab memory tune`` measures them (``CELL/memory/``); every other key
    is a ``memory tune --set`` setting."""

    facts: int = Field(1000, ge=1, description="new facts to store")
    # None: 32 random characters each; an attribute of the world (e.g. birth_city): a
    # value of its pool each
    values: str | None = None

    def settings(self) -> MemorySettings:
        return MemorySettings(**self.model_dump(exclude={"facts", "values"}))


class CellConfig(Strict):
    name: str
    regime: str = "pretrain+finetune"  # pretrain+finetune | mixed
    qa_ratio: float = Field(0.8, gt=0, lt=1)  # mixed: share of all-QA sequences (batches)
    # mixed: what is drawn QA-or-bio. sequence (the paper's): QA packed several to a
    # sequence, each sequence all-QA with probability qa_ratio. batch: one question per
    # row, each whole batch all-QA with probability qa_ratio (a QA batch is trimmed to its
    # questions' length, ~5x cheaper per row at context 128; pretrain.steps then counts
    # QA and bio batches together)
    mix: str = "sequence"
    # the questions the cell trains on (finetune or mixed) and is asked (extract): forward
    # ("What is the birth date of NAME?") and/or inverse ("Who was born on ... and worked
    # for ...?", the full name asked; Part 3.2; bioS worlds). Forward questions are always
    # asked in extraction.
    questions: list[str] = ["forward"]
    # bio packing: concat (join with EOS, cut every `context` tokens; the paper's) or whole
    # (never split a bio; pad the rest of a sequence) or named (concat, with the leading
    # fragment of a split bio kept in context but out of the loss) -- see DocStream.
    # A mapping is a curriculum over pretraining steps, in order: {whole: 0.8, named: 0.2}
    # packs whole for the first 80% of the steps, then named (tokens.mixing.Schedule)
    packing: str | dict[str, float] = "concat"
    world: CorpusConfig = CorpusConfig()  # the world and how it is rendered
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    probe: ProbeStep | None = None  # P-/Q-probing of the pretrained model (default off)
    # memory tuning on the trained model (default off)
    memory: MemoryStep | None = None
    # the cell's stages in order (factlab.experiments.stages); default from `regime`:
    # pretrain, finetune (or mixed), probe when `probe` is set, extract, memory when
    # `memory` is set
    stages: list[str] | None = None

    def stage_list(self) -> list[str]:
        if self.stages is not None:
            return list(self.stages)
        train = ["mixed"] if self.regime == "mixed" else ["pretrain", "finetune"]
        return train + (["probe"] if self.probe is not None else []) + ["extract"] + \
            (["memory"] if self.memory is not None else [])

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        if v is None:
            return v
        from factlab.experiments.stages import STAGES

        bad = [s for s in v if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
        if not v:
            raise ValueError("a cell needs at least one stage")
        return list(v)

    @field_validator("questions")
    @classmethod
    def _questions(cls, v):
        from factlab.text.qa import QUESTIONS

        bad = [k for k in v if k not in QUESTIONS]
        if bad or not v:
            raise ValueError(f"choose one or more of {', '.join(QUESTIONS)}"
                             + (f" (got {bad[0]!r})" if bad else ""))
        return list(dict.fromkeys(v))

    @field_validator("mix")
    @classmethod
    def _mix(cls, v):
        if v not in ("sequence", "batch"):
            raise ValueError("must be 'sequence' or 'batch'")
        return v

    @field_validator("regime")
    @classmethod
    def _regime(cls, v):
        if v not in ("pretrain+finetune", "mixed"):
            raise ValueError("must be 'pretrain+finetune' or 'mixed'")
        return v

    @field_validator("packing")
    @classmethod
    def _packing(cls, v):
        kinds = ("concat", "whole", "named")
        if isinstance(v, str):
            if v not in kinds:
                raise ValueError("must be 'concat', 'whole' or 'named', or a mapping of "
                                 "them to fractions of the pretraining steps")
            return v
        if not v:
            raise ValueError("a packing schedule needs at least one packing")
        bad = [k for k in v if k not in kinds]
        if bad:
            raise ValueError(f"unknown packing {bad[0]!r} in the schedule (choose from "
                             f"{', '.join(kinds)})")
        if any(not (f > 0) for f in v.values()) or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"the fractions of a packing schedule must be > 0 and sum to 1, "
                             f"got {dict(v)}")
        return dict(v)

    @model_validator(mode="after")
    def _inverse(self):
        if "inverse" in self.questions and self.world.facts:
            raise ValueError("questions: inverse search asks for a person from the six bioS "
                             "attributes; a world made from a fact file has no such question")
        return self

    @model_validator(mode="after")
    def _schedule(self):
        if isinstance(self.packing, dict) and len(self.packing) > 1:
            for name, n in packing_segments(self.packing, self.pretrain.steps):
                if n < 1:
                    raise ValueError(f"packing {name!r} gets no step of the "
                                     f"{self.pretrain.steps} pretraining steps")
        return self


def packing_segments(packing: str | dict[str, float], steps: int) -> list[tuple[str, int]]:
    """``[(packing, steps), ...]`` in order; the step counts sum to ``steps``."""
    if isinstance(packing, str):
        return [(packing, steps)]
    names, fracs = list(packing), list(accumulate(packing.values()))
    ends = [int(round(f * steps)) for f in fracs[:-1]] + [steps]
    return [(k, e - b) for k, b, e in zip(names, [0] + ends[:-1], ends)]


class Recipe(Strict):
    name: str
    description: str = ""
    parallel: int = Field(1, ge=1)  # cells trained at once (separate processes)
    cells: list[CellConfig]


# every cell field but its name may be set once for all cells (derived, so a new field is
# shared without a second list to keep in step)
SHARED = tuple(k for k in CellConfig.model_fields if k != "name")


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FactlabError(f"{p}: no such recipe file")
        return p
    res = resources.files("factlab.experiments").joinpath("recipes", f"{name_or_path}.yaml")
    if not res.is_file():
        known = sorted(x.name[:-5] for x in resources.files("factlab.experiments")
                       .joinpath("recipes").iterdir() if x.name.endswith(".yaml"))
        raise FactlabError(f"unknown recipe {name_or_path!r} (known: {', '.join(known)}; "
                           f"or a path to a .yaml file)")
    return Path(str(res))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe, apply ``key.sub=value`` overrides to the shared part, expand cells."""
    path = recipe_path(name_or_path)
    data = deep_merge(load_yaml(path), parse_overrides(overrides))
    cells = data.pop("cells", None)
    if not cells:
        raise FactlabError(f"{path}: a recipe needs a non-empty 'cells' list")
    shared = {k: data.pop(k) for k in list(data) if k in SHARED}
    # run a subset of cells: only=single,multi5+permute. A recipe may name its default
    # subset (fig3: the paper's five cells); only=all runs every cell
    only = data.pop("only", None)
    if str(only).strip() == "all":
        only = None
    expanded = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or "name" not in cell:
            raise FactlabError(f"{path}: cells[{i}] needs a name")
        expanded.append(deep_merge(shared, cell))
    recipe = build(Recipe, {**data, "cells": expanded}, source=str(path))
    if only:
        wanted = [w.strip() for w in str(only).split(",")]
        missing = [w for w in wanted if w not in {c.name for c in recipe.cells}]
        if missing:
            raise FactlabError(f"only={only}: no cell named {missing[0]!r}")
        recipe.cells = [c for c in recipe.cells if c.name in wanted]
    names = [c.name for c in recipe.cells]
    if len(set(names)) != len(names):
        raise FactlabError(f"{path}: cell names must be unique")
    return recipe
