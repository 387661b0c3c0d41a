"""Methods plug into the one loop through these hooks (Avalanche-style, no deep
inheritance). Every hook is optional; the loop calls them in plugin order.

=====================  =========================================================
``setup(loop)``        wrap / modify ``loop.model`` before the optimizer is built
                       (e.g. LoRA adapters, a frozen backbone + memory bank)
``trainable(loop)``    parameters the optimizer trains (default: all with
                       ``requires_grad``)
``next_batch(loop, step, batch)``  replace or extend the batch about to be trained
                       (rehearsal buffers, curricula); must be deterministic in step
``compute_loss(loop, model, batch)``  the micro-batch's loss computed by the plugin
                       instead of the LM forward/loss (probes: a classifier over a
                       frozen backbone; the batch may carry extra keys, every tensor
                       already on the device); ``None``: not this plugin. The first
                       plugin returning a tensor wins; ``extra_loss`` then gets
                       ``out=None``
``extra_loss(loop, batch, out)``   a tensor added to the loss (regularisers); ``out`` is a
                       ``factlab.train.lm_loss.LMOutput``: logits of the target
                       positions only, their mask and target ids
``after_step(loop, step, logs)``   after each optimizer step (logs is mutable)
``before_experience(loop, i)`` / ``after_experience(loop, i)``  stream boundaries
``export(loop, model)``  the plain HF model to save as the run's result
``state_dict()`` / ``load_state_dict(d)``  plugin state saved in checkpoints
=====================  =========================================================
"""

from __future__ import annotations

from factlab.errors import FactlabError


class Plugin:
    name = "plugin"

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
    three.) ``export`` merges the adapters so the result loads with
    ``AutoModelForCausalLM.from_pretrained``."""

    name = "lora"

    def __init__(self, r: int = 8, r_embed: int = 128, alpha: float | None = None,
                 dropout: float = 0.0):
        self.r, self.r_embed, self.alpha, self.dropout = r, r_embed, alpha, dropout

    def setup(self, loop) -> None:
        from peft import LoraConfig, get_peft_model

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
        return model.merge_and_unload()
