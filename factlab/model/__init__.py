"""Models: HF causal LMs built from scratch at named sizes (GPT-2-with-rotary via the
GPT-NeoX classes, or Llama-style), or loaded from a local directory."""

from factlab.model.build import SIZES, build_model, flops_per_token, load_model

__all__ = ["SIZES", "build_model", "flops_per_token", "load_model"]
