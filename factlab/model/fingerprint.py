"""A fingerprint of a model's frozen weights: how many tensors and elements, their dtype,
and the sha256 of their bytes (plus the path the model was loaded from).

Checkpoints of methods over a frozen backbone store it instead of the backbone, and a
wrapper directory names its backbone by path and fingerprint, so a resume or a load on
other weights is refused instead of silently mixing them.
"""

from __future__ import annotations

import hashlib

import torch


def _frozen_params(model):
    """Named parameters, including a backbone held by reference
    (``factlab.model.wrapper.FrozenBackbone``: not a registered submodule)."""
    yield from model.named_parameters(remove_duplicate=False)
    backbone = model.__dict__.get("backbone")
    if isinstance(backbone, torch.nn.Module):
        for name, p in backbone.named_parameters(remove_duplicate=False):
            yield f"backbone.{name}", p


def frozen_fingerprint(model, *, every: bool = False, params=None) -> dict:
    """``{"tensors", "elements", "sha256", "path", "dtype"}`` of the frozen parameters:
    those not in ``params`` when it is given (what the optimizers train), else those
    without ``requires_grad``; ``every``: of all parameters (a backbone's)."""
    h = hashlib.sha256()
    n = k = 0
    seen = set()
    ids = None if params is None else {id(p) for p in params}
    dtypes: set[str] = set()
    for name, p in _frozen_params(model):
        trained = (id(p) in ids) if ids is not None else p.requires_grad
        if (trained and not every) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        dtypes.add(str(p.dtype).replace("torch.", ""))
        n += p.numel()
        k += 1
    cfg = getattr(model, "config", None)
    path = getattr(model, "backbone_path", None) or getattr(cfg, "_name_or_path", None) or None
    return {"tensors": k, "elements": n, "sha256": h.hexdigest() if k else None,
            "path": str(path) if path else None, "dtype": ",".join(sorted(dtypes)) or None}
