"""Probe settings (validated; unknown keys are errors).

Defaults are the paper's (Part 3.1, §5 / App. E–F) except the number of steps (paper:
30k), which a CPU run cannot afford; ``None`` means "the paper's value for this kind".
"""

from __future__ import annotations

from pydantic import Field, field_validator

from factlab.config import Strict
from factlab.train.config import TrainConfig, check_precision

KINDS = ("p", "q")
EMBEDDING_MODES = ("per_task", "per_probe", "shared")
NORMS = ("layer", "batch")
HEADS = ("linear", "tied")
Q_READS = ("end", "name")
CHOICES = {"norm": NORMS, "head": HEADS, "q_read": Q_READS, "embedding": EMBEDDING_MODES}

# the paper's per-kind defaults: P-probing rank-2 update + LayerNorm, batch 50;
# Q-probing rank-16 update + BatchNorm, batch 200
PAPER = {"p": {"rank": 2, "norm": "layer", "batch_size": 50},
         "q": {"rank": 16, "norm": "batch", "batch_size": 200}}


class ProbeSettings(Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps (paper: 30,000)")
    batch_size: int | None = Field(None, ge=2, description="people per step (paper: 50 P, 200 Q)")
    lr: float = Field(1e-3, gt=0)  # linear to 0
    weight_decay: float = Field(0.3, ge=0)
    rank: int | None = Field(None, ge=0, description="rank of the embedding update (2 P, 16 Q)")
    norm: str | None = None  # layer | batch (None: layer for P, batch for Q)
    # per_task: one rank-r update per task, shared by its positions (default);
    # per_probe: one per (task, position), i.e. fully separate probes; shared: one for all
    embedding: str = "per_task"
    tasks: list[str] | None = None  # a subset by name, e.g. [university/value]; None: all
    people: int | None = Field(None, ge=4, description="cap on the people probed")
    train_fraction: float = Field(0.5, gt=0, lt=1)  # people the probe trains on
    entry: int = Field(0, ge=0)  # P-probing: which bio entry of each person is fed
    # Q-probing's read position: end (the paper's: "<bos> name <eos>", read at <eos>) or
    # name (no <eos>: read at the name's last token, where a model that never saw <eos>
    # after a name in training holds what it knows of the person)
    q_read: str = "end"
    # the classifier: linear (the paper's: a free weight row per class) or tied (each
    # class scored by the model's own output embedding of the class's tokens after a
    # learnt width x width map, identity at the start; its parameters do not grow with the
    # classes, so it reads what a few hundred probe-training people cannot teach a free
    # classifier of 50 classes: docs/probing.md)
    head: str = "linear"
    seed: int = 0
    eval_batch_size: int = Field(256, ge=1)
    precision: str = "auto"  # as TrainConfig: bf16 on GPUs that have it, fp32 on CPU
    log_every: int = Field(50, ge=1)

    @field_validator("norm", "head", "q_read", "embedding")
    @classmethod
    def _choice(cls, v, info):
        options = CHOICES[info.field_name]
        if v is not None and v not in options:  # norm None: the paper's for the kind
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v):
        return check_precision(v)


class ProbeConfig(ProbeSettings):
    """One probe run: ``kind`` p (bios, six positions) or q (``<start> name <end>``)."""

    kind: str = "p"

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if v not in KINDS:
            raise ValueError("must be 'p' or 'q'")
        return v

    def resolved(self) -> ProbeConfig:
        """A copy with every ``None`` replaced by the paper's value for this kind."""
        fill = {k: v for k, v in PAPER[self.kind].items() if getattr(self, k) is None}
        return self.model_copy(update=fill)

    def train_config(self) -> TrainConfig:
        """The loop's settings: AdamW, lr linear to 0, no warmup, no clipping (so that
        tasks trained jointly do not share a gradient-norm budget)."""
        r = self.resolved()
        return TrainConfig(steps=r.steps, batch_size=r.batch_size, lr=r.lr,
                           weight_decay=r.weight_decay, schedule="linear", min_lr_ratio=0.0,
                           warmup=0, clip=0.0, precision=r.precision, seed=r.seed,
                           log_every=min(r.log_every, r.steps))


class ProbeStep(ProbeSettings):
    """The optional ``probe`` step of a recipe cell: every kind in ``kinds`` on the cell's
    BIO-pretrained model (the mixed-trained model in a ``mixed`` cell)."""

    kinds: list[str] = ["p", "q"]

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        bad = [k for k in v if k not in KINDS]
        if bad or not v:
            raise ValueError("must be a non-empty list of 'p' and/or 'q'")
        return list(dict.fromkeys(v))

    def config(self, kind: str) -> ProbeConfig:
        return ProbeConfig(**self.model_dump(exclude={"kinds"}), kind=kind)
