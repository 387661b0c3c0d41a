"""Causal LMs from scratch at named sizes, or from a local directory.

Two architectures, both plain HF ``transformers`` classes so that ``save_pretrained`` /
``from_pretrained``, ``generate`` (KV cache), ``peft`` and ``accelerate`` work unchanged:

- ``gpt2-rope``: GPT-2 with rotary position embeddings, as in Physics of LM Part 3.1 —
  built from the GPT-NeoX classes: pre-LN, **sequential** residual
  (``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``; NeoX's default is parallel), rotary on
  1/4 of each head's dims with base 10,000, tanh-GELU MLP of 4x width, biases, no
  absolute position embeddings, dropout 0.
- ``llama``: ``LlamaForCausalLM`` of the same shape (RMSNorm, SwiGLU of 4x width, rotary
  on all head dims, no biases).

Input and output embeddings are **untied** for both (the HF default for both classes): the
QA finetuning recipe puts a LoRA on the token embedding only, which is cleaner when the
output head is a separate matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedModel

from factlab.errors import FactlabError

# intermediate (MLP) width is 4x width unless a size dict says otherwise
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "heads": 2, "width": 64},  # tests
    "small": {"layers": 4, "heads": 4, "width": 128},  # CPU quickstart
    "gpt2-small": {"layers": 12, "heads": 12, "width": 768},  # the paper's 124M shape
    "gpt2-302m": {"layers": 12, "heads": 20, "width": 1280},
}
ARCHS = ("gpt2-rope", "llama")
ROTARY_PCT = 0.25  # gpt2-rope: fraction of each head's dims that get rotary
ROPE_BASE = 10_000.0
_SIZE_KEYS = {"layers", "heads", "width", "intermediate"}


def resolve_size(size: str | dict) -> dict[str, int]:
    """``size`` as a dict {layers, heads, width, intermediate}; a name or a custom dict."""
    if isinstance(size, str):
        if size not in SIZES:
            raise FactlabError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)} "
                               f"or give {{layers, heads, width}}")
        shape = dict(SIZES[size])
    elif isinstance(size, dict):
        unknown = set(size) - _SIZE_KEYS
        if unknown:
            raise FactlabError(f"unknown model size key {sorted(unknown)[0]!r}; "
                               f"allowed: {', '.join(sorted(_SIZE_KEYS))}")
        missing = {"layers", "heads", "width"} - set(size)
        if missing:
            raise FactlabError(f"model size dict lacks {sorted(missing)[0]!r}; "
                               f"give layers, heads and width")
        shape = {k: size[k] for k in size}
    else:
        raise FactlabError(f"model size must be a name ({', '.join(SIZES)}) or a dict, "
                           f"got {type(size).__name__}")
    for k, v in shape.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise FactlabError(f"model size {k} must be a positive integer, got {v!r}")
    if shape["width"] % shape["heads"]:
        raise FactlabError(f"model width {shape['width']} is not divisible by "
                           f"heads {shape['heads']}")
    shape.setdefault("intermediate", 4 * shape["width"])
    return shape


def _config(arch: str, shape: dict, vocab_size: int, context: int, bos_id, eos_id, pad_id):
    common = dict(
        vocab_size=vocab_size, hidden_size=shape["width"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
        max_position_embeddings=context, initializer_range=0.02, attention_dropout=0.0,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=False, use_cache=True,
    )
    if arch == "gpt2-rope":
        head_dim = shape["width"] // shape["heads"]
        if int(head_dim * ROTARY_PCT) % 2 or int(head_dim * ROTARY_PCT) == 0:
            raise FactlabError(f"gpt2-rope needs a head size whose quarter is even and > 0; "
                               f"width {shape['width']} / heads {shape['heads']} = {head_dim}")
        return GPTNeoXConfig(
            **common, hidden_act="gelu_pytorch_tanh", hidden_dropout=0.0,
            classifier_dropout=0.0, layer_norm_eps=1e-5, use_parallel_residual=False,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE,
                             "partial_rotary_factor": ROTARY_PCT},
        )
    return LlamaConfig(
        **common, hidden_act="silu", num_key_value_heads=shape["heads"], rms_norm_eps=1e-5,
        attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
    )


def build_model(arch: str, size: str | dict, vocab_size: int, context: int, *, bos_id,
                eos_id, pad_id, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM; the same ``seed`` gives the same weights.

    The caller's global torch RNG is left as it was (the init runs in a forked RNG).
    """
    if arch not in ARCHS:
        raise FactlabError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    shape = resolve_size(size)
    if vocab_size <= 0 or context <= 0:
        raise FactlabError(f"vocab_size and context must be positive, got {vocab_size}, {context}")
    for name, tid in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise FactlabError(f"{name} {tid} is outside the vocabulary (size {vocab_size})")
    config = _config(arch, shape, vocab_size, context, bos_id, eos_id, pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return model


def load_model(path, **kwargs) -> PreTrainedModel:
    """Any local HF causal LM directory (ours or a user's pretrained model); no download."""
    p = Path(path)
    if not p.is_dir():
        raise FactlabError(f"model path {str(path)!r} does not exist or is not a directory")
    if not (p / "config.json").is_file():
        raise FactlabError(f"model path {str(path)!r} has no config.json "
                           f"(not a save_pretrained directory)")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, **kwargs)
        # an absolute path: a wrapper or adapter trained on it names its backbone so,
        # and loads from any working directory
        model.config._name_or_path = str(p.resolve())
        return model
    except (OSError, ValueError) as e:  # missing/corrupt weights, unknown model type
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FactlabError(f"cannot load model from {str(path)!r}: {msg}") from e


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·layers·width·seq_len (PaLM appendix B / nanoGPT).

    N counts every parameter except the input embedding table when it is untied (a lookup
    costs no FLOPs; the output head is a real matmul and is counted). The second term is
    the attention scores/values matmuls over a context of ``seq_len``.
    """
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    if emb_in is not None and (emb_out is None or emb_out.weight is not emb_in.weight):
        n -= emb_in.weight.numel()
    return float(6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len)
