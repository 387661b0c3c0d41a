"""Task identification without a task id: one LoRA adapter per experience over one frozen
causal LM, and a router that picks the adapter of every example from the frozen LM's own
query (issue 15 §2).

:class:`RoutedAdapters` holds the adapters as named ``peft`` LoRA adapters ``e1``, ``e2``,
... on one ``PeftModel`` (rank ``r`` on the attention projections of
``factlab.train.plugins._LORA_TARGETS``), plus the routing keys: experience 0 is the base
world, answered by the backbone with no adapter at all.

- **Query**: :func:`factlab.continual.query.frozen_query` of the unadapted backbone
  (name-span pooling when entity names are given, else mean pooling), at a middle-to-late
  layer; computed per row, so a row's route does not depend on its batch.
- **Keys** (``keys=``): ``"examples"`` (default) stores the query of every training
  example of an experience (a bio; a question without its answer), L2-normalised and
  labelled with the experience; ``"mean"`` stores one key per experience, the normalised
  mean of its examples' normalised queries. An experience's score for a row is its best
  cosine over its keys.
- **Tie rule** (updated facts): an update experience re-teaches a question the base world
  (or an earlier experience) also holds, so two experiences can match a question equally
  well. Among the experiences whose score is within ``margin`` (default 0.02) of the best,
  the **latest** wins: newer knowledge overrides older.
- **Routing** (``routing=``): ``"hard"`` gives every row one adapter, through peft's
  mixed-batch inference (``adapter_names=[...]`` per row, ``"__base__"`` for experience 0)
  in ``forward`` and in ``generate``; ``"soft"`` activates every adapter and scales each
  adapter's contribution per row by ``softmax_j(score_j / temperature)`` over experiences
  0..T (experience 0's share is "no adapter"): a forward hook on every ``lora_B[e_j]``
  module multiplies its output row by that row's weight, which also holds during cached
  generation (the batch dimension is fixed; beams repeat each row's weights);
  ``"oracle"`` uses the true experience of every prompt from a lookup table
  (:meth:`RoutedAdapters.set_oracle`, keyed by the prompt's unpadded token ids; a
  teacher-forced row, prompt + answer, is matched by its longest prefix in the table; a
  row matching none is an error). :meth:`RoutedAdapters.forced` makes every row use one
  given experience. ``"sum"`` is O-LoRA's (Wang et al. 2023): no router and no keys;
  every adapter is active for every row (the sum of their updates), in training too, where
  the earlier ones are frozen; :class:`ExperienceAdapters` ``ortho`` adds the penalty
  λ Σ_{j<t} ‖A_j A_tᵀ‖²_F over the adapted modules, which pushes experience t's LoRA into
  a subspace orthogonal to the earlier ones'.
- **Training** (the wrapper in train mode): only the current experience's adapter is
  active and requires grad, no routing; the earlier adapters are frozen (``sum``: they
  are active as well, frozen).
- **Adapted modules** (``modules=``): the attention projections of ``_LORA_TARGETS``
  (``"attention"``), or those and the MLP projections (``"attention+mlp"``, what the
  continual recipe uses: measured on the quickstart's base, attention-only adapters learn
  a 50-person cohort to 16% in 300 steps at lr 3e-3, with the MLP 68%). Not the token
  embedding the ``LoRA`` plugin also adapts: soft routing scales each adapter's ``lora_B``
  module per row, and an embedding adapter's B is a bare parameter.

:class:`ExperienceAdapters` is the plugin of the one loop: before experience t it adds
adapter ``e{t}`` (dynamic expansion: the parameters added are recorded per experience in
``added``) and stores experience t's keys (experience 0's, from the base world's
``ExperienceData`` given to the plugin, before the first). A recipe should wrap the model
with :meth:`ExperienceAdapters.wrap` before it builds the driver: a bad layer, pool or
model type then fails before anything is written, and row 0 is scored on the wrapper
without adapters (the base model). :func:`route` reports the experience each prompt is
routed to (routing accuracy).

Saving: a ``factlab_wrapper.json`` directory (``factlab.model.load.load_any`` opens it)
holding every adapter's tensors, the keys, and the routing settings (mode, oracle table);
the backbone is named by path and by the fingerprint of its **base** weights. peft injects
its layers into the backbone's modules, so the backbone's own fingerprint after wrapping
would count the adapters (under renamed keys); the base fingerprint is therefore taken
once, when the wrapper is built, before any injection (the base weights are frozen, so it
stays true). The adapters' LoRA modules are registered in the wrapper as well
(``adapters.e{t}.<module path>.A / .B``), so its ``state_dict``, ``parameters()``,
checkpoints and exports hold them and nothing of the backbone.

Resuming (``factlab.train.experiences.Driver``): the adapters are created in a fixed order
and each one's initial weights come from its own seed (``seed``, t), so a restored run
re-creates e1..e{done} (whose saved weights then load) and a later experience's adapter
starts where it would have in an uninterrupted run. Keys are persistent buffers (they grow;
loading takes the saved size), so they travel with the driver's state.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factlab.continual.query import POOLS, NameIndex, check_layer, default_layer, frozen_query
from factlab.errors import FactlabError
from factlab.evaluate.score import _pad_id
from factlab.model.wrapper import FORMAT, MARKER, WEIGHTS, FrozenBackbone
from factlab.train.plugins import _LORA_TARGETS, Plugin

ROUTINGS = ("hard", "soft", "oracle", "sum")
KEY_KINDS = ("examples", "mean")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


# the MLP projections of each family (``modules="attention+mlp"``): where a transformer
# keeps most of its facts
_MLP_TARGETS = {
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_fc", "mlp.c_proj"],
}
MODULES = ("attention", "attention+mlp")


def _adapter(t: int) -> str:
    return f"e{int(t)}"


class RoutedAdapters(FrozenBackbone):
    """A frozen causal LM with one LoRA adapter per experience and a router (module doc).

    ``names``: the token-id sequences of the entities' names (a
    :class:`~factlab.continual.query.NameIndex` or its ``ids``) for the ``name`` pool;
    ``pool`` defaults to ``name`` with names, else ``mean``; ``layer`` to
    :func:`~factlab.continual.query.default_layer`. Adapters are added by
    :meth:`add_experience`, keys by :meth:`add_keys`."""

    def __init__(self, backbone, *, r: int = 8, alpha: float | None = None, names=None,
                 pool: str | None = None, layer: int | None = None, keys: str = "examples",
                 routing: str = "hard", temperature: float = 0.05, margin: float = 0.02,
                 seed: int = 0, modules: str = "attention", backbone_path: str | None = None):
        from peft import PeftModel

        from factlab.model.fingerprint import frozen_fingerprint

        if isinstance(backbone, PeftModel):
            raise FactlabError("RoutedAdapters: the backbone is already a peft model; give "
                               "the plain causal LM (the router adds its own adapters)")
        mtype = getattr(getattr(backbone, "config", None), "model_type", None)
        if mtype not in _LORA_TARGETS:
            raise FactlabError(f"RoutedAdapters: no LoRA target modules for model type "
                               f"{mtype!r} (known: {', '.join(_LORA_TARGETS)})")
        if keys not in KEY_KINDS:
            raise FactlabError(f"router keys {keys!r}: choose one of {', '.join(KEY_KINDS)}")
        if int(r) < 1:
            raise FactlabError(f"router: LoRA rank r must be >= 1, got {r}")
        if not temperature > 0:
            raise FactlabError(f"router: temperature must be > 0, got {temperature}")
        if not margin >= 0:
            raise FactlabError(f"router: margin must be >= 0, got {margin}")
        if isinstance(names, NameIndex):
            names = [list(s) for s in names.ids]
        elif names is not None:
            try:
                names = [[int(x) for x in s] for s in names]
            except (TypeError, ValueError):
                raise FactlabError("router names: give the names' token-id sequences (or a "
                                   "NameIndex); ExperienceAdapters encodes names given as "
                                   "text") from None
        pool = pool or ("name" if names else "mean")
        if pool not in POOLS:
            raise FactlabError(f"router query pool {pool!r}: choose one of {', '.join(POOLS)}")
        if pool == "name" and not names:
            raise FactlabError("router query pool 'name' needs the entities' names")
        if routing not in ROUTINGS:
            raise FactlabError(f"routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
        layer = default_layer(backbone) if layer is None else check_layer(backbone, layer)
        super().__init__(backbone, backbone_path=backbone_path)
        object.__setattr__(self, "_hf", backbone)  # the HF model peft injects into
        # the base weights' fingerprint, before any adapter is injected (module doc)
        self.base_sha256 = frozen_fingerprint(backbone, every=True)["sha256"]
        self.r, self.alpha = int(r), float(alpha) if alpha else float(2 * int(r))
        if modules not in MODULES:
            raise FactlabError(f"router modules {modules!r}: choose one of {', '.join(MODULES)}")
        self.modules_kind = modules
        self.targets = list(_LORA_TARGETS[mtype][0]) + (
            list(_MLP_TARGETS.get(mtype, [])) if modules == "attention+mlp" else [])
        self.name_ids = [list(map(int, s)) for s in names] if names else None
        self.names = NameIndex(self.name_ids) if names else None
        self.pool = pool
        self.layer = layer
        self.keys_kind = keys
        self.routing = routing
        self.temperature, self.margin, self.seed = float(temperature), float(margin), int(seed)
        self.adapters = nn.ModuleDict()
        d = int(getattr(backbone.config, "hidden_size", None) or
                backbone.get_input_embeddings().weight.shape[1])
        self.register_buffer("keys", torch.zeros(0, d))  # L2-normalised
        self.register_buffer("key_exp", torch.zeros(0, dtype=torch.long))
        self.current = 0  # the adapter train mode uses (the experience being trained)
        self._forced: int | None = None
        self._soft_w: torch.Tensor | None = None
        self._oracle: dict[tuple, int] = {}
        self._oracle_lengths: list[int] = []

    # ------------------------------------------------------------------ settings
    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, mode: str) -> None:
        if mode not in ROUTINGS:
            raise FactlabError(f"routing {mode!r}: choose one of {', '.join(ROUTINGS)}")
        self._routing = mode

    @property
    def n_experiences(self) -> int:
        """Adapters held: experiences 1..n have a module (0, the base, always has)."""
        return len(self.adapters)

    def _check_experience(self, t, what: str = "experience") -> int:
        n = self.n_experiences
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) <= n:
            held = f"adapters e1..e{n}" if n else "no adapters"
            raise FactlabError(f"router: {what} {t!r} has no module (it holds {held}; "
                               f"0 is the base model)")
        return int(t)

    def get_input_embeddings(self):
        return self._hf.get_input_embeddings()

    def get_output_embeddings(self):
        return self._hf.get_output_embeddings()

    @property
    def config(self):
        return self._hf.config

    # ------------------------------------------------------------------ expansion
    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=0.0,
                          target_modules=list(self.targets), bias="none",
                          task_type="CAUSAL_LM")

    def add_experience(self) -> int:
        """Add adapter ``e{n+1}`` (LoRA B = 0: the model's outputs do not change) and make
        it the current one; its initial weights come from (``seed``, its index) only.
        Returns its experience index."""
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        t = self.n_experiences + 1
        name = _adapter(t)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed * 1_000_003 + t)
            try:
                if t == 1:
                    object.__setattr__(self, "backbone",
                                       get_peft_model(self._hf, self._lora_config(),
                                                      adapter_name=name))
                else:
                    self.backbone.add_adapter(name, self._lora_config())
            except ValueError as e:
                raise FactlabError(f"router: peft cannot add adapter {name} "
                                   f"({str(e).splitlines()[0]})") from None
        mods = nn.ModuleDict()
        for path, mod in self._hf.named_modules():
            if isinstance(mod, LoraLayer) and name in mod.lora_A:
                mods[path.replace(".", "-")] = nn.ModuleDict(
                    {"A": mod.lora_A[name], "B": mod.lora_B[name]})
                self.add_hook(mod.lora_B[name], self._scaler(t))
        if not len(mods):
            raise FactlabError(f"router: peft found none of the target modules "
                               f"{self.targets} in the backbone")
        self.adapters[name] = mods
        self.backbone.train(False)
        self.set_current(t)
        return t

    def set_current(self, t: int) -> None:
        """The adapter train mode trains and uses (the others frozen, no routing)."""
        t = self._check_experience(t)
        self.current = t
        if t and self.routing == "sum":  # every adapter so far in the forward
            self.backbone.base_model.set_adapter([_adapter(j) for j in range(1, t + 1)])
        elif t:
            self.backbone.set_adapter(_adapter(t))  # requires_grad on it alone
        for j in range(1, self.n_experiences + 1):
            for p in self.adapters[_adapter(j)].parameters():
                p.requires_grad_(j == t)

    def adapter_parameters(self, t: int) -> list[nn.Parameter]:
        if not 1 <= int(t) <= self.n_experiences:
            self._check_experience(t)
            raise FactlabError("router: experience 0 (the base model) has no parameters")
        return list(self.adapters[_adapter(t)].parameters())

    def parameter_count(self, t: int) -> int:
        return int(sum(p.numel() for p in self.adapter_parameters(t)))

    def orthogonality(self, t: int) -> torch.Tensor:
        """O-LoRA's Σ_{j<t} Σ_modules ‖A_j A_tᵀ‖²_F (A: a LoRA's down projection, r x in),
        differentiable in adapter t only (the earlier ones are frozen)."""
        t = self._check_experience(t)
        cur = self.adapters[_adapter(t)] if t else {}
        total = None
        for j in range(1, t):
            old = self.adapters[_adapter(j)]
            for path, mods in cur.items():
                a_t = mods["A"].weight
                a_j = old[path]["A"].weight.detach()
                term = (a_j.float() @ a_t.float().t()).pow(2).sum()
                total = term if total is None else total + term
        if total is None:
            dev = next(self._hf.parameters()).device
            return torch.zeros((), device=dev)
        return total

    # ----------------------------------------------------------------------- keys
    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        for name in ("keys", "key_exp"):  # the keys grow: take the saved size
            v = state_dict.get(prefix + name)
            if v is not None:
                setattr(self, name, torch.empty_like(v, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def keyed(self) -> set[int]:
        """The experiences that have keys."""
        return set(self.key_exp.unique().tolist())

    def add_keys(self, t: int, queries: torch.Tensor) -> int:
        """Store experience ``t``'s keys from its examples' queries (N, d), replacing any it
        had; returns the number of keys stored."""
        t = self._check_experience(t)
        q = F.normalize(queries.detach().float(), dim=-1)
        if q.dim() != 2 or q.shape[1] != self.keys.shape[1] or not len(q):
            raise FactlabError(f"router: experience {t}'s queries have shape "
                               f"{tuple(q.shape)}, need (N > 0, {self.keys.shape[1]})")
        if self.keys_kind == "mean":
            q = F.normalize(q.mean(0, keepdim=True), dim=-1)
        keep = self.key_exp != t
        dev = self.keys.device
        self.keys = torch.cat([self.keys[keep], q.to(dev, self.keys.dtype)])
        self.key_exp = torch.cat([self.key_exp[keep],
                                  torch.full((len(q),), t, dtype=torch.long, device=dev)])
        return len(q)

    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
              ) -> torch.Tensor:
        """(B, d) fp32 router query of every row (the unadapted backbone's)."""
        q = frozen_query(self.backbone, input_ids, attention_mask, layer=self.layer,
                         pool=self.pool, names=self.names)
        if self.n_experiences:  # peft's re-enable flags the active adapter trainable
            self.set_current(self.current)
        return q

    def queries(self, seqs, batch_size: int = 64) -> torch.Tensor:
        """(N, d) queries of token sequences (lists / arrays of ids, unpadded)."""
        out = [None] * len(seqs)
        dev = self.device
        for ids, mask, idx in _batches(seqs, batch_size, _pad_id(self)):
            q = self.query(ids.to(dev), mask.to(dev)).cpu()
            for row, i in enumerate(idx):
                out[i] = q[row]
        return torch.stack(out) if out else torch.zeros(0, self.keys.shape[1])

    # -------------------------------------------------------------------- routing
    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """(B, n+1) best cosine of every row to each experience's keys (-inf: none)."""
        n = self.n_experiences
        if not len(self.key_exp):
            raise FactlabError("router: no routing keys yet (add an experience's keys first)")
        top = int(self.key_exp.max())
        if top > n:
            raise FactlabError(f"router: keys route to experience {top}, which has no "
                               f"module (adapters e1..e{n})")
        keys = self.keys.to(q.device, torch.float32)
        sims = F.normalize(q.float(), dim=-1) @ keys.T
        best = torch.full((len(q), n + 1), -torch.inf, device=q.device)
        lab = self.key_exp.to(q.device)[None, :].expand(len(q), -1)
        return best.scatter_reduce(1, lab, sims, reduce="amax", include_self=True)

    def choose(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the experience every row routes to: the latest of those within ``margin``
        of the best score (module doc)."""
        s = self.scores(q)
        near = s >= s.max(1, keepdim=True).values - self.margin
        idx = torch.arange(s.shape[1], device=s.device).expand_as(s)
        return torch.where(near, idx, -1).max(1).values

    def soft_weights(self, q: torch.Tensor) -> torch.Tensor:
        """(B, n+1) soft routing weights: softmax over experiences of score / T."""
        return torch.softmax(self.scores(q) / self.temperature, dim=1)

    # the oracle -----------------------------------------------------------------
    def set_oracle(self, token_id_lists, experiences) -> None:
        """The true experience of every prompt (``tokenizer(prompt)["input_ids"]``, as
        ``factlab.evaluate.generate`` encodes it); ``routing="oracle"`` then uses it. A
        prompt given twice keeps its latest experience."""
        seqs, exps = list(token_id_lists), list(experiences)
        if len(seqs) != len(exps):
            raise FactlabError(f"oracle: {len(seqs)} prompts but {len(exps)} experiences")
        table: dict[tuple, int] = {}
        for s, e in zip(seqs, exps):
            e = self._check_experience(int(e) if isinstance(e, (int, np.integer)) else e,
                                       "oracle experience")
            key = tuple(int(x) for x in s)
            if not key:
                raise FactlabError("oracle: an empty prompt")
            table[key] = max(e, table.get(key, e))
        self._oracle = table
        self._oracle_lengths = sorted({len(k) for k in table}, reverse=True)

    def _oracle_rows(self, input_ids, attention_mask) -> list[int]:
        if not self._oracle:
            raise FactlabError("oracle routing: no oracle table (call set_oracle first)")
        out = []
        for row, m in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            ids = tuple(x for x, keep in zip(row, m) if keep)
            e = self._oracle.get(ids)
            if e is None:  # a teacher-forced row: prompt + answer
                e = next((self._oracle[ids[:n]] for n in self._oracle_lengths
                          if n < len(ids) and ids[:n] in self._oracle), None)
            if e is None:
                raise FactlabError(f"oracle routing: a prompt is not in the oracle table "
                                   f"(token ids {list(ids[:12])}{' ...' if len(ids) > 12 else ''})")
            out.append(self._check_experience(e, "oracle experience"))
        return out

    @contextlib.contextmanager
    def forced(self, t: int):
        """Within this block every row uses experience ``t``'s adapter (0: none)."""
        t = self._check_experience(t)
        was, self._forced = self._forced, t
        try:
            yield self
        finally:
            self._forced = was

    # the plan of a batch ----------------------------------------------------------
    def experiences_of(self, input_ids, attention_mask=None) -> list[int]:
        """The experience every row routes to under the current mode (soft: the
        experience hard routing would pick)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._forced is not None:
            return [self._forced] * len(input_ids)
        if self.routing == "oracle":
            return self._oracle_rows(input_ids, attention_mask)
        return self.choose(self.query(input_ids, attention_mask)).tolist()

    def _plan(self, input_ids, attention_mask):
        if input_ids is None:
            raise FactlabError("router: routing needs input_ids (inputs_embeds cannot be "
                               "routed)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.routing == "soft" and self._forced is None:
            return None, self.soft_weights(self.query(input_ids, attention_mask))
        exps = self.experiences_of(input_ids, attention_mask)
        return [_adapter(e) if e else BASE for e in exps], None

    def _scaler(self, j: int):
        def scale(module, args, out):
            w = self._soft_w
            if w is None:
                return None
            col = w[:, j]
            if out.shape[0] != col.shape[0]:  # beams: each row repeated
                if out.shape[0] % col.shape[0]:
                    raise FactlabError(f"soft routing: a batch of {out.shape[0]} rows for "
                                       f"{col.shape[0]} routed prompts")
                col = col.repeat_interleave(out.shape[0] // col.shape[0])
            return out * col.to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return scale

    @contextlib.contextmanager
    def _soft(self, w: torch.Tensor | None):
        every = [_adapter(j) for j in range(1, self.n_experiences + 1)]
        self.backbone.base_model.set_adapter(every, inference_mode=True)
        self._soft_w = w
        try:
            yield
        finally:
            self._soft_w = None
            self.set_current(self.current)

    def _call(self, fn, input_ids, attention_mask, kwargs):
        if self.training or not self.n_experiences:
            base = self.n_experiences and not self.current  # train mode, no adapter
            with self.active(), (self.backbone.disable_adapter() if base else
                                 contextlib.nullcontext()):
                return fn(**kwargs)
        if self.routing == "sum" and self._forced is None:
            with self._soft(None), self.active():  # every adapter, unscaled
                return fn(**kwargs)
        names, w = self._plan(input_ids, attention_mask)
        if w is not None:
            with self._soft(w), self.active():
                return fn(**kwargs)
        with self.active():
            return fn(adapter_names=names, **kwargs)

    # -------------------------------------------------------------------- protocol
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self._call(self.backbone, input_ids, attention_mask,
                          dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def generate(self, *args, **kwargs):
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise FactlabError("router generate: pass input_ids once, by keyword")
            kwargs["input_ids"] = args[0]
        return self._call(self.backbone.generate, kwargs.get("input_ids"),
                          kwargs.get("attention_mask"), kwargs)

    # ------------------------------------------------------------------ persistence
    def wrapper_config(self) -> dict:
        cfg = {"r": self.r, "alpha": self.alpha, "names": self.name_ids, "pool": self.pool,
               "layer": self.layer, "keys": self.keys_kind, "routing": self.routing,
               "temperature": self.temperature, "margin": self.margin, "seed": self.seed,
               "modules": self.modules_kind,
               "experiences": self.n_experiences, "current": self.current}
        if self._oracle:
            cfg["oracle"] = {"prompts": [list(k) for k in self._oracle],
                             "experiences": list(self._oracle.values())}
        return cfg

    @classmethod
    def from_config(cls, backbone, config: dict, backbone_path: str | None = None):
        config = dict(config)
        n, current = int(config.pop("experiences", 0)), config.pop("current", None)
        oracle = config.pop("oracle", None)
        model = cls(backbone, backbone_path=backbone_path, **config)
        for _ in range(n):
            model.add_experience()
        if current is not None:
            model.set_current(int(current))
        if oracle:
            model.set_oracle(oracle["prompts"], oracle["experiences"])
        return model

    def save_pretrained(self, path, **_) -> None:
        """The wrapper directory (module doc); the backbone is named by the fingerprint of
        its base weights, taken before peft injected the adapters."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        marker = {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}",
                  "backbone": {"path": self.backbone_path, "sha256": self.base_sha256},
                  "config": self.wrapper_config()}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / WEIGHTS))
        (path / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _batches(seqs, batch_size: int, pad: int):
    """Right-padded (ids, mask, indices) batches of ``seqs``, longest first."""
    if batch_size < 1:
        raise FactlabError("batch_size must be >= 1")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if len(lengths) and (lengths == 0).any():
        raise FactlabError(f"router: sequence {int(np.flatnonzero(lengths == 0)[0])} is empty")
    order = np.argsort(-lengths, kind="stable")
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size].tolist()
        width = int(lengths[idx[0]])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            s = torch.as_tensor(np.asarray(seqs[i], dtype=np.int64))
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        yield ids, mask, idx


def route(model, tokenizer, prompts, *, batch_size: int = 64) -> list[int]:
    """The experience every prompt is routed to (0: the base model), encoded as
    ``factlab.evaluate.generate`` encodes prompts; under the model's current mode (soft:
    the experience hard routing picks; oracle: the table's). Independent of
    ``batch_size`` (every row's query is its own)."""
    if not isinstance(model, RoutedAdapters):
        raise FactlabError(f"route: a {type(model).__name__} is not a routed adapter model")
    prompts = list(prompts)
    if not prompts:
        return []
    enc = tokenizer(prompts)["input_ids"]
    out: list[int] = [0] * len(enc)
    dev = model.device
    with torch.inference_mode():
        for ids, mask, idx in _batches(enc, batch_size, _pad_id(model)):
            for i, e in zip(idx, model.experiences_of(ids.to(dev), mask.to(dev))):
                out[i] = int(e)
    return out


def example_sequences(data, seq_len: int | None = None) -> list[np.ndarray]:
    """The inputs of an ``ExperienceData``'s examples, as its keys see them: every bio
    (cut at ``seq_len``) and every question without its answer."""
    seqs = []
    if data is None:
        return seqs
    if data.docs is not None:
        for i in range(len(data.docs)):
            s = data.docs.item(i)
            seqs.append(s[:seq_len] if seq_len else s)
    if data.qa is not None:
        start = np.asarray(data.qa.answer_start)
        for q in range(len(data.qa)):
            seqs.append(data.qa.item(q)[:int(start[q])])
    return [s for s in seqs if len(s)]


class ExperienceAdapters(Plugin):
    """One LoRA adapter per experience plus a router over them, as a plugin of the one
    loop (module doc). ``base``: the base world's ``ExperienceData`` (experience 0's keys;
    without it no row is routed to the base model). ``added[t]``: the parameters (and
    keys) experience t added."""

    name = "adapters"

    def __init__(self, base=None, *, r: int = 8, alpha: float | None = None, names=None,
                 pool: str | None = None, layer: int | None = None, keys: str = "examples",
                 routing: str = "hard", temperature: float = 0.05, margin: float = 0.02,
                 seed: int = 0, modules: str = "attention", batch_size: int = 64,
                 ortho: float = 0.0):
        if routing not in ("hard", "soft", "sum"):
            raise FactlabError(f"adapters routing {routing!r}: choose hard, soft or sum "
                               f"(oracle routing is set on the model with its table)")
        if not ortho >= 0:
            raise FactlabError(f"adapters: ortho (O-LoRA's λ) must be >= 0, got {ortho}")
        self.ortho = float(ortho)
        if keys not in KEY_KINDS:
            raise FactlabError(f"router keys {keys!r}: choose one of {', '.join(KEY_KINDS)}")
        pool = pool or ("name" if names else "mean")
        if pool not in POOLS:
            raise FactlabError(f"router query pool {pool!r}: choose one of {', '.join(POOLS)}")
        if pool == "name" and not names:
            raise FactlabError("router query pool 'name' needs the entities' names")
        if layer is not None and (isinstance(layer, bool) or
                                  not isinstance(layer, (int, np.integer)) or layer < 0):
            raise FactlabError(f"router query layer must be an int >= 0, got {layer!r}")
        if int(r) < 1 or not temperature > 0 or not margin >= 0 or batch_size < 1:
            raise FactlabError("adapters: need r >= 1, temperature > 0, margin >= 0, "
                               "batch_size >= 1")
        self.base = base
        self.kw = {"r": int(r), "alpha": alpha, "pool": pool, "layer": layer, "keys": keys,
                   "routing": routing, "temperature": temperature, "margin": margin,
                   "seed": seed, "modules": modules}
        self.entity_names = list(names) if names else None
        self.batch_size = int(batch_size)
        self.added: dict[int, dict] = {}

    # the model ---------------------------------------------------------------------
    def wrap(self, model, tokenizer=None) -> RoutedAdapters:
        """``model`` wrapped (a bad layer, pool or model type fails here, before training:
        a recipe can call this up front)."""
        if isinstance(model, RoutedAdapters):
            return model
        names = None
        if self.entity_names:
            if tokenizer is None:
                raise FactlabError("adapters: the name pool needs the loop's tokenizer")
            names = NameIndex.from_names(tokenizer, self.entity_names)
        return RoutedAdapters(model, names=names, **self.kw)

    def _model(self, loop) -> RoutedAdapters:
        if not isinstance(loop.model, RoutedAdapters):
            loop.model = self.wrap(loop.model, getattr(loop, "tokenizer", None))
        return loop.model

    def _expand(self, m: RoutedAdapters, upto: int) -> None:
        while m.n_experiences < upto:
            t = m.add_experience()
            self.added.setdefault(t, {"params": m.parameter_count(t), "keys": 0})

    def _keys(self, loop, m: RoutedAdapters, t: int, data) -> None:
        if data is None or t in m.keyed() or m.routing == "sum":  # sum: nothing to route
            return
        seq_len = getattr(getattr(loop, "stream", None), "seq_len", None)
        n = m.add_keys(t, m.queries(example_sequences(data, seq_len), self.batch_size))
        self.added.setdefault(t, {"params": m.parameter_count(t) if t else 0, "keys": 0})
        self.added[t]["keys"] = n

    def _data(self, loop, t: int):
        if t == 0:
            return self.base
        driver = getattr(loop, "driver", None)
        s = driver.experiences[t - 1].stream if driver is not None else loop.stream
        data = getattr(s, "data", None)
        if data is None:
            raise FactlabError(f"adapters: experience {t}'s stream is a {type(s).__name__} "
                               f"without examples (.data): its routing keys need them")
        return data

    # the hooks -----------------------------------------------------------------------
    def before_experience(self, loop, t: int) -> None:
        m = self._model(loop)
        self._expand(m, t)
        m.set_current(t)
        self._keys(loop, m, 0, self.base)
        self._keys(loop, m, t, self._data(loop, t))

    def setup(self, loop) -> None:
        m = self._model(loop)
        t = getattr(loop, "experience", None)
        if t is None:  # a plain loop: one experience, set up here
            self._expand(m, 1)
            m.set_current(1)
            self._keys(loop, m, 0, self.base)
            if getattr(getattr(loop, "stream", None), "data", None) is not None:
                self._keys(loop, m, 1, loop.stream.data)
            return
        # a driver: before_experience(t) made e{t}; a restored driver's stub (t = done + 1)
        # re-creates e1..e{done}, whose saved weights and keys load next
        self._expand(m, t - 1)
        m.set_current(min(t, m.n_experiences))

    def trainable(self, loop):
        m = self._model(loop)
        t = getattr(loop, "experience", None) or 1
        if t == m.n_experiences + 1:
            # a finished driver restored: its stub is experience T = done, whose adapter
            # setup (done + 1 would be past the end) did not create
            self._expand(m, t)
        return m.adapter_parameters(t)

    def extra_loss(self, loop, batch: dict, out):
        """O-LoRA's orthogonality penalty (``ortho`` > 0) on the experience training now."""
        m = loop.model
        if not self.ortho or not isinstance(m, RoutedAdapters) or m.current < 2:
            return None
        return self.ortho * m.orthogonality(m.current)

    def state_dict(self) -> dict:
        rows = [[t, a["params"], a["keys"]] for t, a in sorted(self.added.items())]
        return {"added": torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)}

    def load_state_dict(self, state: dict) -> None:
        if state and "added" in state:
            self.added = {int(t): {"params": int(p), "keys": int(k)}
                          for t, p, k in state["added"].tolist()}
