"""One training loop for every regime (BIO pretraining, QA finetuning full or LoRA, mixed
training) and, through plugins, every later method (memory experts, continual strategies,
probes)."""

from factlab.train.config import TrainConfig
from factlab.train.loop import Loop
from factlab.train.plugins import LoRA, Plugin

__all__ = ["TrainConfig", "Loop", "Plugin", "LoRA"]
