"""A frozen backbone plus trainable parameters of a method's own, held by reference.

Memory experts (a bank added to some layers), prompt pools (prompts prepended to the
input) and adapter routers all keep a pretrained causal LM frozen and train a few tensors
around it. :class:`FrozenBackbone` is the one base class for them:

- the backbone is **not** a registered submodule (``object.__setattr__``): it is never
  copied, never in the wrapper's ``state_dict``, never in its ``parameters()``, so an
  optimizer, a checkpoint or an export sees only what the method adds; its weights get
  ``requires_grad=False``. Device and dtype moves (``.to``, ``.cuda``) still reach it.
- the backbone stays in eval mode (dropout off) when the wrapper trains, unless the
  method asks otherwise (``backbone_train=True``).
- hooks a method puts on backbone modules (:meth:`add_hook`) act only inside the wrapper's
  own calls (:meth:`active`): the same backbone object, called directly, is the untouched
  model, so "wrapped equals backbone before tuning" is testable on one object.
- the **evaluation protocol** (what ``factlab.evaluate.generate`` and the loop need):
  ``forward(input_ids, attention_mask=None, **kw)`` returning an HF output with
  ``.logits``, ``generate(...)`` (HF's, run with the hooks active), ``eval()``,
  ``train()``, ``device``, ``config``, ``get_input_embeddings()``,
  ``get_output_embeddings()``. A wrapper that changes the input (prepends prompts)
  overrides ``forward`` and ``generate``.
- saved as a directory: ``factlab_wrapper.json`` (marker: class, backbone path and
  fingerprint, the method's config) + ``wrapper.safetensors`` (its own tensors);
  ``factlab.model.load.load_any`` opens it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from factlab.errors import FactlabError

MARKER = "factlab_wrapper.json"
WEIGHTS = "wrapper.safetensors"
FORMAT = 1
REGISTRY: dict[str, type] = {}  # "module:qualname" -> every subclass defined in this process


class FrozenBackbone(nn.Module):
    """Base class of frozen-backbone methods; subclasses add parameters (and hooks) in
    ``__init__`` and implement :meth:`wrapper_config` / :meth:`from_config`. Every subclass
    is registered by ``module:qualname``, so the loader finds a user's own class once it
    is defined, and imports only ``factlab.*`` modules by name."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        REGISTRY[f"{cls.__module__}:{cls.__qualname__}"] = cls

    def __init__(self, backbone, *, backbone_path: str | None = None,
                 backbone_train: bool = False):
        super().__init__()
        if isinstance(backbone, FrozenBackbone):
            raise FactlabError("a FrozenBackbone cannot wrap another one (wrap its backbone)")
        backbone.requires_grad_(False)
        object.__setattr__(self, "backbone", backbone)  # by reference: see module doc
        path = backbone_path or getattr(getattr(backbone, "config", None), "_name_or_path", "")
        # absolute, so the saved wrapper loads from any working directory
        self.backbone_path = str(Path(path).resolve()) if path and Path(path).exists() else \
            (str(path) if path else None)
        self.backbone_train = bool(backbone_train)
        self._hooks: list = []
        self._active = 0
        backbone.train(False)

    # ---------------------------------------------------------- the backbone follows
    def _apply(self, fn, recurse=True):
        self.backbone._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(bool(mode and self.backbone_train))
        return self

    @property
    def config(self):
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self):
        return self.backbone.dtype

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    # ---------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def active(self):
        """Within this block the method's hooks on the backbone act."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def add_hook(self, module: nn.Module, fn) -> None:
        """A forward hook ``fn(module, args, output) -> output | None`` on a backbone
        module that acts only while :meth:`active`."""
        def hook(mod, args, output):
            return fn(mod, args, output) if self._active else None

        self._hooks.append(module.register_forward_hook(hook))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -------------------------------------------------------------------- protocol
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        with self.active():
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active():
            return self.backbone.generate(*args, **kwargs)

    # ------------------------------------------------------------------ persistence
    def wrapper_config(self) -> dict:
        """JSON-able arguments that :meth:`from_config` rebuilds the wrapper from."""
        return {}

    @classmethod
    def from_config(cls, backbone, config: dict, backbone_path: str | None = None):
        return cls(backbone, backbone_path=backbone_path, **config)

    def save_pretrained(self, path, **_) -> None:
        """Write the marker and the wrapper's own tensors into ``path`` (the caller makes
        it atomic: the loop writes into a temp dir and renames)."""
        from safetensors.torch import save_file

        from factlab.model.fingerprint import frozen_fingerprint

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        marker = {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}",
                  "backbone": {"path": self.backbone_path,
                               "sha256": frozen_fingerprint(self.backbone, every=True)["sha256"]},
                  "config": self.wrapper_config()}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / WEIGHTS))
        (path / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
