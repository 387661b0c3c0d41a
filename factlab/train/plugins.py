"""Methods plug into the one loop through these hooks (Avalanche-style, no deep
inheritance). Every hook is optional; the loop calls them in plugin order.

=====================  =========================================================
``setup(loop)``        wrap / modify ``loop.model`` before the optimizer is built
                       (e.g. LoRA adapters, a frozen backbone + memory bank). Must be
                       idempotent: the experience driver runs one loop per experience
                       on the same model, so a second call must not wrap again
``trainable(loop)``    parameters, or parameter groups (dicts with ``params`` and
                       optional ``lr``, ``weight_decay``, ``sparse``, ``name``), that
                       the optimizers train; the groups of all plugins are united
                       (default: every parameter with ``requires_grad``); see
                       ``factlab.train.optim``
``next_batch(loop, step, batch)``  replace or extend the batch about to be trained
                       (rehearsal buffers, curricula); must be deterministic in step;
                       every row returned is trained
``compute_loss(loop, model, batch)``  the micro-batch's loss computed by the plugin
                       instead of the LM forward/loss (probes: a classifier over a
                       frozen backbone; the batch may carry extra keys, every tensor
                       already on the device); ``None``: not this plugin. The first
                       plugin returning a tensor wins; ``extra_loss`` then gets
                       ``out=None``
``extra_loss(loop, batch, out)``   a tensor added to the loss (regularisers); ``batch`` is
                       the micro-batch with its bookkeeping columns (``example_id``,
                       ``experience``); ``out`` is a ``factlab.train.lm_loss.LMOutput``:
                       logits of the target positions only, their mask, target ids,
                       per-position NLL / argmax flags and rows (``loop.stop()`` ends
                       the run when, say, every fact is recalled)
``after_step(loop, step, logs)``   after each optimizer step (logs is mutable)
``before_experience(loop, i)`` / ``after_experience(loop, i)``  experience boundaries,
                       called by ``factlab.train.experiences.Driver`` around the loop of
                       experience ``i`` (1-based); ``before_experience`` may replace
                       ``loop.stream`` (replay, joint, cumulative training; all
                       experiences are ``loop.driver.experiences``); plugin state is
                       saved after ``after_experience`` (a Fisher computed there survives
                       a kill)
``export(loop, model)``  what to save as the run's result (anything with
                       ``save_pretrained``); must not change ``model``, which later
                       experiences go on training
``state_dict()`` / ``load_state_dict(d)``  plugin state saved in checkpoints
=====================  =========================================================
"""

from __future__ import annotations

import torch

from factlab.errors import FactlabError


class Plugin:
    name = "plugin"

    def progress_text(self) -> str:
        """A few words the progress bar shows after each step (e.g. facts done)."""
        return ""

    def setup(self, loop) -> None: ...

    def trainable(self, loop):
        return None

    def next_batch(self, loop, step: int, batch: dict) -> dict:
        return batch

    def compute_loss(self, loop, model, batch: dict):
        return None

    def extra_loss(self, loop, batch: dict, out):
        return None

    def after_step(self, loop, step: int, logs: dict) -> None: ...

    def before_experience(self, loop, i: int) -> None: ...

    def after_experience(self, loop, i: int) -> None: ...

    def export(self, loop, model):
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


# attention projections and token embedding, per HF model family
_LORA_TARGETS = {
    "gpt_neox": (["query_key_value"], "embed_in"),  # q, k, v are one fused matrix
    "llama": (["q_proj", "v_proj"], "embed_tokens"),
    "gpt2": (["c_attn"], "wte"),
    "mistral": (["q_proj", "v_proj"], "embed_tokens"),
    "qwen2": (["q_proj", "v_proj"], "embed_tokens"),
}


class LoRA(Plugin):
    """The paper's QA-finetuning LoRA: rank ``r`` on the attention query/value projections
    of every layer and rank ``r_embed`` on the token embedding, via ``peft``; base weights
    frozen. (GPT-NeoX fuses q, k and v into one matrix, so there the adapter covers all
    three.) A model that is already a ``PeftModel`` is trained as it is (a second
    experience goes on training the same adapter).

    ``export="merged"`` (default) saves the base weights plus the adapters' deltas as a
    plain HF model, loadable by ``AutoModelForCausalLM.from_pretrained``, computed without
    merging into (or copying) the model being trained; ``export="adapter"`` saves the peft
    adapter directory only (``factlab.model.load.load_any`` opens it on its base)."""

    name = "lora"

    def __init__(self, r: int = 8, r_embed: int = 128, alpha: float | None = None,
                 dropout: float = 0.0, export: str = "merged"):
        if export not in ("merged", "adapter"):
            raise FactlabError(f"LoRA export={export!r}: choose merged or adapter")
        self.r, self.r_embed, self.alpha, self.dropout = r, r_embed, alpha, dropout
        self.export_as = export

    def setup(self, loop) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(loop.model, PeftModel):
            return
        mtype = loop.model.config.model_type
        if mtype not in _LORA_TARGETS:
            raise FactlabError(f"LoRA: no default target modules for model type {mtype!r} "
                               f"(known: {', '.join(_LORA_TARGETS)})")
        attn, embed = _LORA_TARGETS[mtype]
        targets = list(attn) + ([embed] if self.r_embed else [])
        cfg = LoraConfig(
            r=self.r, lora_alpha=self.alpha or 2 * self.r, lora_dropout=self.dropout,
            target_modules=targets,
            rank_pattern={embed: self.r_embed} if self.r_embed else {},
            alpha_pattern={embed: 2 * self.r_embed} if self.r_embed else {},
            bias="none", task_type="CAUSAL_LM")
        loop.model = get_peft_model(loop.model, cfg)

    def export(self, loop, model):
        if self.export_as == "adapter":
            return model
        return _Merged(model)


class _Merged:
    """A peft model's merged weights, saved through the base model's ``save_pretrained``
    with an explicit state dict: base weight + the adapter's delta for every LoRA layer,
    adapter tensors dropped. Nothing is merged into the live model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def state_dict(self) -> dict:
        from peft.tuners.lora import LoraLayer

        base = self.peft_model.get_base_model()
        deltas = {}
        for name, mod in base.named_modules():
            if isinstance(mod, LoraLayer):
                delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters
                            if a in mod.lora_A or a in getattr(mod, "lora_embedding_A", {}))
                deltas[name] = delta
        out = {}
        for k, v in base.state_dict().items():
            if "lora_" in k:
                continue
            key = k.replace(".base_layer.", ".")
            mod = key.rsplit(".", 1)[0]
            if k.endswith(".base_layer.weight") and mod in deltas:
                v = v + deltas[mod].to(v.dtype)
            out[key] = v.detach()
        return out

    def save_pretrained(self, path, **kwargs) -> None:
        base = self.peft_model.get_base_model()
        kwargs.pop("state_dict", None)
        sd = self.state_dict()
        cfg = base.config
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        untie = False
        if tied:  # an adapted embedding no longer equals its tied head: save them untied
            inp, out = base.get_input_embeddings(), base.get_output_embeddings()
            keys = [_key_of(base, getattr(m, "base_layer", m).weight) for m in (inp, out)]
            untie = None not in keys and keys[0] in sd and keys[1] in sd and \
                not torch.equal(sd[keys[0]], sd[keys[1]])
        try:
            if untie:
                cfg.tie_word_embeddings = False
            base.save_pretrained(path, state_dict=sd, **kwargs)
        finally:
            cfg.tie_word_embeddings = tied


def _key_of(model, param) -> str | None:
    """The merged state-dict key of ``param`` (its first name, ``.base_layer.`` dropped)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name.replace(".base_layer.", ".")
    return None
