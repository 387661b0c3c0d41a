"""Where a Hugging Face causal LM keeps its decoder layers (methods that hook a layer --
memory banks, prompt-pool queries, routers -- find them here)."""

from __future__ import annotations

from torch import nn

from factlab.errors import FactlabError

# where the decoder layers of each supported family live
LAYER_PATHS = ("gpt_neox.layers", "model.layers", "transformer.h", "model.decoder.layers")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of ``model`` (a peft model is looked through to its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in LAYER_PATHS:
        mod = base
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod):
            return mod
    mtype = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    raise FactlabError(f"cannot find the decoder layers of a {mtype!r} model "
                       f"(supported: GPT-NeoX, Llama, Mistral, Qwen2, GPT-2 and others "
                       f"with {' / '.join(LAYER_PATHS)})")
