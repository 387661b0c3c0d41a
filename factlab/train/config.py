"""Training hyper-parameters (validated; unknown keys are errors)."""

from __future__ import annotations

from pydantic import Field, field_validator

from factlab.config import Strict


PRECISIONS = ("auto", "bf16", "fp16", "no")


def check_precision(v: str) -> str:
    """auto: bf16 on GPUs that have it, fp32 on CPU (see ``factlab.train.loop``)."""
    if v not in PRECISIONS:
        raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
    return v


# TrainConfig fields that set how often a run logs, evaluates and checkpoints: they change
# its record and its speed, not what it trains (runs differing only in them are one
# experiment: the capacity series key, the reproduction table's settings)
CADENCE_FIELDS = frozenset({"log_every", "eval_every", "ckpt_every", "ckpt_minutes"})


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step (all processes)")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the decay ends at lr * min_lr_ratio
    warmup: int = Field(0, ge=0)
    schedule: str = "cosine"  # cosine | linear (both decay to lr * min_lr_ratio) | constant
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    clip: float = Field(1.0, ge=0)  # 0 disables clipping
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | no
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    ckpt_every: int = Field(0, ge=0)  # every N steps (0: none by step count)
    # and every so many minutes of training (0: none by time); always at the end
    ckpt_minutes: float = Field(2.0, ge=0)
    optimizer: str = "adamw"  # adamw (fused) | adafactor (transformers') | sgd
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    # parameter groups a plugin marks sparse (embedding-like tables): see factlab.train.optim
    sparse_optimizer: str = "row_adagrad"  # row_adagrad | sparse_adam | sgd

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v):
        if v not in ("cosine", "linear", "constant"):
            raise ValueError("must be 'cosine', 'linear' or 'constant'")
        return v

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v):
        if v not in ("adamw", "adafactor", "sgd"):
            raise ValueError("must be 'adamw', 'adafactor' or 'sgd'")
        return v

    @field_validator("sparse_optimizer")
    @classmethod
    def _sparse_optimizer(cls, v):
        if v not in ("row_adagrad", "sparse_adam", "sgd"):
            raise ValueError("must be 'row_adagrad', 'sparse_adam' or 'sgd'")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v):
        return check_precision(v)
