"""P-probing and Q-probing (Physics of LM Part 3.1, §5): where does a BIO-pretrained
model keep each attribute, and can it be read off the name alone?

A probe is a frozen model plus a few trainable parameters — a low-rank update of the
token embedding, a norm and a linear classifier per task and read position — trained on
the one training loop through :class:`ProbePlugin`. See ``docs/probing.md``.
"""

from factlab.probe.config import ProbeConfig, ProbeStep
from factlab.probe.data import (ProbeData, ProbeStream, Task, p_probe_inputs, probe_data,
                                probe_tasks, q_probe_inputs, split_people)
from factlab.probe.heads import ProbeModel, probe_loss
from factlab.probe.plugin import ProbePlugin
from factlab.probe.run import (evaluate_probe, prepare, probe_cell, resolve_target, run_probe,
                               summarise)

__all__ = ["ProbeConfig", "ProbeStep", "ProbeData", "ProbeStream", "Task", "p_probe_inputs",
           "q_probe_inputs", "probe_data", "probe_tasks", "split_people", "ProbeModel",
           "probe_loss", "ProbePlugin", "evaluate_probe", "prepare", "probe_cell",
           "resolve_target", "run_probe", "summarise"]
