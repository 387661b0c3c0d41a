"""What a checkpoint holds: the trainable state only.

A run that trains a LoRA adapter, a memory bank or a prompt pool over a frozen backbone
must not write the backbone again at every checkpoint (135M parameters for SmolLM2, each
time). :func:`save_trainable` writes the parameters that train plus the module's
persistent buffers (safetensors); the frozen rest is recorded by a fingerprint (count and
sha256 of its bytes, plus the backbone's path when the model knows it), and
:func:`load_trainable` refuses a checkpoint whose frozen part differs from the model it is
loaded into. A full finetune has no frozen part: its checkpoint is the whole model.

"Trainable" means what the optimizers train when ``params`` is given (the loop passes its
parameter groups), else ``requires_grad``: a method that freezes part of what it trains
mid-run (pinned memory routing) keeps that part in its checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from factlab.errors import FactlabError
from factlab.model.fingerprint import frozen_fingerprint


def _is_trained(p, params) -> bool:
    return id(p) in params if params is not None else p.requires_grad


def _ids(params):
    return None if params is None else {id(p) for p in params}


def _frozen_names(model, params=None) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False)
            if not _is_trained(p, params)}


def trainable_state(model, params=None) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers, one name per storage (tied weights
    once)."""
    frozen = _frozen_names(model, _ids(params))
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in frozen:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def save_trainable(model, path: str | Path, params=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.cpu().contiguous() for k, v in trainable_state(model, params).items()},
              str(path))


def load_trainable(model, path: str | Path, frozen: dict | None = None, params=None) -> None:
    """Load :func:`save_trainable`'s file into ``model`` (in place). With ``frozen`` (the
    fingerprint saved beside it), check first that the frozen part is the same."""
    from safetensors.torch import load_file

    if frozen is not None and frozen.get("sha256") is not None:
        now = frozen_fingerprint(model, params=params)
        if now["sha256"] != frozen["sha256"]:
            was, is_ = frozen.get("dtype"), now.get("dtype")
            why = f" (saved with {was} weights, given {is_})" if was and was != is_ else ""
            raise FactlabError(f"{path}: this checkpoint was trained on other frozen weights "
                               f"({frozen.get('path') or 'unknown backbone'}, "
                               f"{frozen['elements']:,} elements) than the model given now{why}")
    sd = load_file(str(path), device="cpu")
    want = trainable_state(model, params)
    missing = [k for k in want if k not in sd]
    # a tensor saved as trainable that is frozen now would be silently dropped: refuse it,
    # except for checkpoints from before trainable-only saving (no fingerprint: whole model)
    lenient = frozen is None
    extra = [k for k in sd if k not in want and not (
        lenient and k in _frozen_names(model, _ids(params)))]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise FactlabError(f"{path}: does not fit the model ({what}; "
                           f"{len(missing)} missing, {len(extra)} unexpected)")
    # through the modules' own loading: a buffer that grows during a run (a key gate's
    # codebook) takes the saved size there
    model.load_state_dict({k: sd[k] for k in want}, strict=False)
