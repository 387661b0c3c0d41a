"""The probe as a plugin of the one training loop: the loop supplies the optimizer,
schedule, precision, device placement, DDP, logging, checkpoints and resume; the plugin
only says how a batch becomes a loss."""

from __future__ import annotations

from factlab.errors import FactlabError
from factlab.probe.heads import ProbeModel, probe_loss
from factlab.train.plugins import Plugin


class ProbePlugin(Plugin):
    """Train a :class:`ProbeModel` (frozen backbone + probe parameters) on batches of
    ``input_ids``, ``positions`` and ``targets`` (a :class:`~factlab.probe.data.ProbeStream`).
    The optimizer sees only the probe's parameters: the backbone is not registered in the
    probe module and its weights have ``requires_grad=False``."""

    name = "probe"

    def setup(self, loop) -> None:
        if not isinstance(loop.model, ProbeModel):
            raise FactlabError(f"ProbePlugin trains a ProbeModel, got {type(loop.model).__name__}")

    def compute_loss(self, loop, model, batch: dict):
        logits = model(batch["input_ids"], batch["positions"])
        return probe_loss(logits, batch["positions"], batch["targets"])
