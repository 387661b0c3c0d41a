"""One loader for everything a run can produce, dispatched on the marker file:

================================  ====================================================
``factlab_wrapper.json``          a frozen-backbone method (``factlab.model.wrapper``):
                                  its class, its backbone (path + fingerprint), its own
                                  tensors; the backbone is loaded (recursively, any
                                  kind) or passed in as ``backbone=``
``adapter_config.json``           a ``peft`` adapter directory, opened on its base model
                                  (``base_model_name_or_path``, or ``backbone=``)
``config.json``                   a plain HF causal-LM directory
================================  ====================================================

``factlab probe`` and evaluation accept any of them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from factlab.errors import FactlabError
from factlab.model.build import load_model
from factlab.model.wrapper import MARKER, REGISTRY, WEIGHTS


def model_kind(path) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FactlabError(f"model path {str(path)!r} does not exist or is not a directory")
    for marker, kind in ((MARKER, "wrapper"), ("adapter_config.json", "adapter"),
                         ("config.json", "hf")):
        if (p / marker).is_file():
            return kind
    raise FactlabError(f"model path {str(path)!r} holds no model: expected {MARKER} (a "
                       f"factlab wrapper), adapter_config.json (a peft adapter) or "
                       f"config.json (an HF model)")


def load_any(path, *, backbone=None, **kwargs):
    """The model saved in ``path`` (see the module doc), in eval mode."""
    kind = model_kind(path)
    if kind == "hf":
        model = load_model(path, **kwargs)
    elif kind == "adapter":
        model = _load_adapter(Path(path), backbone, **kwargs)
    else:
        model = _load_wrapper(Path(path), backbone, **kwargs)
    return model.eval()


def _load_adapter(p: Path, backbone, **kwargs):
    from peft import PeftModel

    cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    if backbone is None:
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise FactlabError(f"{p}: the adapter names no base model; pass backbone=")
        base_path = Path(base) if Path(base).is_absolute() else (p / base)
        if not base_path.is_dir() and Path(base).is_dir():
            base_path = Path(base)
        backbone = load_any(base_path, **kwargs)
    try:
        return PeftModel.from_pretrained(backbone, str(p), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FactlabError(f"{p}: cannot load the adapter ({str(e).splitlines()[0]})") from e


def _load_wrapper(p: Path, backbone, **kwargs):
    from safetensors.torch import load_file

    from factlab.model.fingerprint import frozen_fingerprint

    try:
        marker = json.loads((p / MARKER).read_text(encoding="utf-8"))
        module, _, qual = marker["class"].partition(":")
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise FactlabError(f"{p / MARKER}: not a valid factlab wrapper marker ({e})") from None
    cls = REGISTRY.get(marker["class"])
    if cls is None:
        if not module.startswith("factlab."):
            # never import arbitrary code named by a file on disk: a user's own wrapper
            # class is found once its module has been imported (it registers itself)
            raise FactlabError(f"{p / MARKER}: class {marker['class']!r} is not a factlab "
                               f"class and is not defined in this process (import it first)")
        try:
            importlib.import_module(module)
        except ImportError:
            pass
        cls = REGISTRY.get(marker["class"])
        if cls is None:
            raise FactlabError(f"{p / MARKER}: unknown wrapper class {marker['class']!r}")
    ref = marker.get("backbone") or {}
    if backbone is None:
        if not ref.get("path"):
            raise FactlabError(f"{p}: the wrapper names no backbone path; pass backbone=")
        backbone = load_any(ref["path"], **kwargs)
    want = ref.get("sha256")
    if want and frozen_fingerprint(backbone, every=True)["sha256"] != want:
        raise FactlabError(f"{p}: the backbone at {ref.get('path')!r} is not the one this "
                           f"wrapper was trained on (weights differ)")
    model = cls.from_config(backbone, marker.get("config") or {}, backbone_path=ref.get("path"))
    sd = load_file(str(p / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise FactlabError(f"{p / WEIGHTS}: does not fit {marker['class']} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return model.to(backbone.device)
