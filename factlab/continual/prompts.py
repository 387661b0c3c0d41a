"""Prompt pools over a frozen causal LM for continual learning: L2P (Wang et al. 2022),
DualPrompt (Wang et al. 2022b) and CODA-Prompt (Smith et al. 2023), ported from a frozen
ViT to a frozen decoder LM. Nothing of the LM trains; only prompts, their keys (and
CODA's attention vectors).

Every input row gets its own prompt, chosen from the frozen LM's own query of that row
(``factlab.continual.query``: by default the states of the entity's name at about 2/3 of
the depth) — **per example**, at training and at test time. The official L2P code's
test-time majority vote over a batch is not implemented: it leaks information between
test examples, and here selections and scores do not depend on the batch (tested).

- ``l2p``: a pool of ``size`` prompts (``length`` virtual tokens each) with one learned
  key each; the ``top`` keys nearest the query by cosine select prompts that are
  concatenated and prepended to the input embeddings. Loss: the LM loss
  − ``lam`` · mean over rows of Σ cos(query, selected keys).
- ``dual``: DualPrompt's input-level form: a shared G-prompt (``g_length`` tokens, trained
  in every experience) followed by the top-1 E-prompt of a keyed pool. (The paper puts G
  in early and E in later layers as prefixes; this port prepends both at the input.)
- ``coda``: CODA-Prompt: ``size`` components with keys and attention vectors; the prompt
  is Σ_m α_m P_m with α_m = cos(q ⊙ A_m, K_m), end to end, no top-k. The components are
  split among the experiences (``experiences`` groups); experience t trains its own group,
  earlier groups are frozen (detached), later ones are not used yet; each new group starts
  orthogonal to the earlier ones (Gram-Schmidt), as in the paper.

Where the prompts go (``placement``):

- ``input`` (default): prompts are virtual tokens prepended to the input embeddings.
- ``prefix``: prefix tuning, as the L2P and DualPrompt papers' prefix variant: every
  prompt is a key and a value prefix of ``length`` positions for the attention of each
  decoder layer it applies to, handed to the frozen LM as a pre-filled key/value cache
  (``transformers.DynamicCache``), so any HF causal LM with a cache takes it. L2P and
  CODA prefix every layer; DualPrompt puts its G-prompt on the first half of the layers
  and the E-prompt on the second half (the paper: G on layers 1-2, E on 3-5 of 12), so
  both have one ``length`` (``g_length`` must equal it). Prefixes start as the frozen
  LM's own keys and values of random tokens. Positions follow the prefix, as after
  input prompts.

Against collapse (every experience selecting the same few prompts):

- ``diversify`` (L2P's frequency-based diversified selection, training only): the
  distance 1 − cos of prompt i is multiplied by (h_i + 1/size), h_i the share of
  selections prompt i had in the earlier experiences, so prompts used less so far win
  ties with prompts used a lot.
- ``masks="disjoint"``: experience t may select (and so train) only its own ``top``
  prompts of the pool, the prompts ``(t-1)·top .. t·top - 1``; at test time the whole
  pool is open. Needs ``size >= top x experiences``.

Bookkeeping: ``usage`` (experiences + 1, size) counts, per experience, how often each
prompt was selected in training (the prompt-usage histogram); :func:`selections` gives
the prompts any input selects, for the **prompt matching rate** (are the prompts a test
fact selects those trained on the fact's experience?).

Updates (a fact whose value changed): nothing special ships. An update experience trains
whatever prompts its own (name-pooled) queries select, which for an updated person are
the prompts that person's earlier text selected, so the stale value is overwritten in the
same prompts where the selection agrees; the stale-answer rate measures where it does not.

Input prompts cost ``P`` extra positions per row (``P = top x length``; DualPrompt
``g_length + length``; CODA ``length``) and one partial forward of the frozen LM (to the
query layer) per row.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from factlab.continual.query import NameIndex, check_layer, default_layer, frozen_query
from factlab.errors import FactlabError
from factlab.model.layers import decoder_layers
from factlab.model.wrapper import FrozenBackbone
from factlab.train.plugins import Plugin

KINDS = ("l2p", "dual", "coda")
PLACEMENTS = ("input", "prefix")


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A key/value cache pre-filled with one (keys, values) pair per layer."""
    try:
        return DynamicCache(ddp_cache_data=layers)  # recent transformers (5.x here)
    except TypeError:
        return DynamicCache.from_legacy_cache(tuple(layers))


def _cache_kw(model) -> str:
    """The name ``model``'s forward gives its key/value cache (``cache`` in transformers
    5.x, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # recent transformers; older ones keep two lists
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _orthogonal_rows(n: int, dim: int, against: torch.Tensor | None, g: torch.Generator
                     ) -> torch.Tensor:
    """``n`` random unit rows of width ``dim``, orthogonal to each other and to the rows
    of ``against`` (Gram-Schmidt; needs n + len(against) <= dim)."""
    basis = []
    if against is not None and len(against):  # an orthonormal basis of their span
        q = torch.linalg.qr(against.float().t()).Q  # (dim, k)
        basis = list(q.t())
    out = []
    while len(out) < n:
        v = torch.randn(dim, generator=g)
        for b in basis + out:
            v = v - (v @ b) * b
        if float(v.norm()) > 1e-6:
            out.append(v / v.norm())
    return torch.stack(out) if out else torch.zeros(0, dim)


class PromptPool(FrozenBackbone):
    """A frozen causal LM whose every input row is prefixed with the prompt its own query
    selects (module doc)."""

    def __init__(self, backbone, *, kind: str = "l2p", size: int = 10, top: int = 5,
                 length: int = 5, g_length: int = 5, layer: int | None = None,
                 pool: str = "name", name_ids: list[list[int]] | None = None,
                 diversify: bool = False, masks: str | None = None, experiences: int = 1,
                 seed: int = 0, placement: str = "input", backbone_path: str | None = None):
        super().__init__(backbone, backbone_path=backbone_path)
        if kind not in KINDS:
            raise FactlabError(f"prompt pool kind {kind!r}: choose one of {', '.join(KINDS)}")
        if placement not in PLACEMENTS:
            raise FactlabError(f"prompt placement {placement!r}: choose one of "
                               f"{', '.join(PLACEMENTS)}")
        if placement == "prefix" and kind == "dual" and g_length != length:
            raise FactlabError(f"DualPrompt prefixes: the G-prompt and the E-prompt sit on "
                               f"different layers of one cache, so g_length ({g_length}) "
                               f"must equal length ({length})")
        if kind == "dual":
            top = 1
        if size < 1 or length < 0 or g_length < 0 or experiences < 1:
            raise FactlabError(f"prompt pool: size ({size}) and experiences ({experiences}) "
                               f"must be >= 1, length ({length}) and g_length ({g_length}) "
                               f">= 0")
        if kind != "coda" and not 1 <= top <= size:
            raise FactlabError(f"prompt pool of {size} prompts cannot select the top {top}: "
                               f"need 1 <= top <= size")
        if masks not in (None, "disjoint"):
            raise FactlabError(f"prompt masks={masks!r}: choose none or disjoint")
        if masks == "disjoint" and kind != "coda" and size < top * experiences:
            raise FactlabError(f"disjoint prompt masks: {experiences} experiences x top {top} "
                               f"need a pool of >= {top * experiences} prompts, got {size}")
        if kind == "coda" and size < experiences:
            raise FactlabError(f"CODA-Prompt: {size} components cannot be split among "
                               f"{experiences} experiences")
        self.kind, self.size, self.top, self.length, self.g_length = kind, size, top, length, \
            g_length
        self.layer = check_layer(backbone, default_layer(backbone) if layer is None else layer)
        if pool == "name" and not name_ids:
            raise FactlabError("prompt pool: pool='name' needs the entities' names "
                               "(name_ids); or choose pool='mean' / 'last'")
        self.pool, self.name_ids = pool, [list(map(int, s)) for s in (name_ids or [])]
        self.names = NameIndex(self.name_ids) if pool == "name" else None
        self.diversify, self.masks, self.experiences, self.seed = bool(diversify), masks, \
            int(experiences), int(seed)
        d = backbone.config.hidden_size
        g = torch.Generator().manual_seed(seed)
        # prompts start as the embeddings of random vocabulary tokens (prompt tuning's
        # usual init: inside the distribution the LM reads); keys and attention vectors
        # random (cosine is scale-free)
        emb = backbone.get_input_embeddings().weight.detach().float().cpu()

        def tokens(*shape):
            idx = torch.randint(0, emb.shape[0], (int(torch.tensor(shape).prod()),),
                                generator=g)
            return emb[idx].reshape(*shape, d).clone()

        self.placement = placement
        self._cache_name = _cache_kw(backbone)
        if placement == "prefix":
            n_layers = len(decoder_layers(backbone))
            half = max(1, n_layers // 2)
            # the layers of the G-prompt and of the pool's prompts
            self.g_layers = list(range(half)) if kind == "dual" and n_layers > 1 else []
            self.p_layers = list(range(len(self.g_layers), n_layers))
            self.n_layers = n_layers
            self.prompts = nn.Parameter(self._own_kv(tokens(size, length), self.p_layers))
        else:
            self.prompts = nn.Parameter(tokens(size, length))
        self.keys = nn.Parameter(torch.randn(size, d, generator=g))
        if kind == "dual" and placement == "prefix" and self.g_layers:
            self.g_prompt = nn.Parameter(self._own_kv(tokens(1, g_length), self.g_layers)[0])
        elif kind == "dual" and placement == "prefix":  # one layer: no G-prompt there
            self.g_prompt = nn.Parameter(torch.zeros(0, 2, g_length, self._kv_width()))
        elif kind == "dual":
            self.g_prompt = nn.Parameter(tokens(g_length))
        if kind == "coda":
            self.attention = nn.Parameter(torch.ones(size, d))
            with torch.no_grad():  # each experience's group orthogonal to the others
                self.keys.copy_(_orthogonal_rows(size, d, None, g) if size <= d
                                else self.keys)
        self.register_buffer("usage", torch.zeros(experiences + 1, size))
        # CODA: which experiences' components were initialised (a resumed run must not
        # initialise them twice)
        self.register_buffer("started", torch.zeros(experiences + 1, dtype=torch.bool))
        self.experience = 1  # the experience training now (masks, usage, CODA's group)
        self.last_pull = None  # Σ cos(query, selected keys), mean over rows (training)
        self.last_selected = None  # (B, top) prompt ids (or CODA's α, (B, size))
        dev = next(backbone.parameters()).device
        super()._apply(lambda t: t.to(dev))

    @torch.no_grad()
    def _own_kv(self, embeds: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """(n, len(layers), 2, length, kv width): the frozen LM's own keys and values at
        ``layers`` of the ``n`` token sequences ``embeds`` (n, length, d)."""
        bb = self.backbone
        dev = next(bb.parameters()).device
        n, length, _ = embeds.shape
        if length == 0:
            return torch.zeros(n, len(layers), 2, 0, self._kv_width())
        was = bb.training
        bb.eval()
        try:
            cache = DynamicCache()
            bb(inputs_embeds=embeds.to(dev, next(bb.parameters()).dtype),
               **{self._cache_name: cache}, use_cache=True)
        finally:
            bb.train(was)
        out = []
        for li in layers:
            k, v = _layer_kv(cache, li)  # (n, heads, length, hd)
            out.append(torch.stack([x.transpose(1, 2).reshape(n, length, -1) for x in (k, v)],
                                   1))
        return torch.stack(out, 1).float().cpu()

    def _kv_heads(self) -> tuple[int, int]:
        """(key/value heads, head width) of the backbone's attention."""
        c = self.backbone.config
        heads = c.num_attention_heads
        kvh = getattr(c, "num_key_value_heads", None) or heads
        return kvh, getattr(c, "head_dim", None) or c.hidden_size // heads

    def _kv_width(self) -> int:
        kvh, hd = self._kv_heads()
        return kvh * hd

    def prefix_cache(self, input_ids, attention_mask=None) -> DynamicCache:
        """``placement="prefix"``: a key/value cache holding every row's prompt at every
        layer (sets ``last_pull``, ``last_selected``; counts usage while training)."""
        B = input_ids.shape[0]
        sel, P = self._pick(self.query(input_ids, attention_mask))
        if self.kind == "coda":
            per = torch.einsum("bm,mksld->bksld", sel.to(P.dtype), P)  # (B, slots, 2, len, w)
        else:
            x = P[sel]  # (B, top, slots, 2, len, w)
            per = x.permute(0, 2, 3, 1, 4, 5).reshape(B, *x.shape[2:4], -1, x.shape[-1])
        kvh, hd = self._kv_heads()
        dtype = next(self.backbone.parameters()).dtype
        layers = []
        slot = {li: k for k, li in enumerate(self.p_layers)}
        gslot = {li: k for k, li in enumerate(self.g_layers)}
        for li in range(self.n_layers):
            if li in gslot:
                kv = self.g_prompt[gslot[li]][None].expand(B, -1, -1, -1)
            else:
                kv = per[:, slot[li]]
            k, v = (x.reshape(B, x.shape[1], kvh, hd).transpose(1, 2).to(dtype)
                    for x in (kv[:, 0], kv[:, 1]))
            layers.append((k.contiguous(), v.contiguous()))
        return _cache_of(layers)

    # -------------------------------------------------------------------- selection
    @property
    def n_virtual(self) -> int:
        """Positions prepended to every row."""
        if self.placement == "prefix":
            return {"l2p": self.top * self.length, "dual": self.length,
                    "coda": self.length}[self.kind]
        return {"l2p": self.top * self.length, "dual": self.g_length + self.length,
                "coda": self.length}[self.kind]

    def group(self, t: int) -> range:
        """CODA: the components of experience t; L2P / DualPrompt with disjoint masks:
        the prompts experience t may select."""
        if self.kind == "coda":
            n = self.size // self.experiences
            lo = (min(t, self.experiences) - 1) * n
            hi = self.size if t >= self.experiences else lo + n
            return range(lo, hi)
        return range((t - 1) * self.top, t * self.top)

    def query(self, input_ids, attention_mask=None) -> torch.Tensor:
        return frozen_query(self.backbone, input_ids, attention_mask, layer=self.layer,
                            pool=self.pool, names=self.names)

    def _select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids (B, top), cos of each selected key (B, top), differentiable)."""
        cos = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(
            self.keys.float(), dim=-1).t()  # (B, size)
        score = (1 - cos).detach()
        if self.training:
            if self.diversify and self.experience > 1:
                h = self.usage[1:self.experience].sum(0)
                h = h / h.sum().clamp(min=1)
                score = score * (h + 1 / self.size)[None]
            if self.masks == "disjoint":
                allowed = torch.zeros(self.size, dtype=torch.bool, device=q.device)
                allowed[list(self.group(self.experience))] = True
                score = score.masked_fill(~allowed[None], float("inf"))
        # ties broken by prompt index (stable), so a row's choice is its own
        idx = torch.sort(score, dim=1, stable=True).indices[:, :self.top]
        return idx, cos.gather(1, idx)

    def _coda_weights(self, q: torch.Tensor) -> torch.Tensor:
        """(B, size) α of every component (0 for components not yet in use; earlier
        experiences' keys and attention frozen)."""
        t = self.experience if self.training else self.experiences
        g = self.group(t)
        K, A = self.keys.float(), self.attention.float()
        if self.training and g.start > 0:
            K = torch.cat([K[:g.start].detach(), K[g.start:]])
            A = torch.cat([A[:g.start].detach(), A[g.start:]])
        a = nn.functional.cosine_similarity(q[:, None, :] * A[None], K[None], dim=-1)
        live = torch.zeros(self.size, dtype=torch.bool, device=q.device)
        live[:g.stop] = True
        return a * live[None]

    def _pick(self, q: torch.Tensor):
        """Every row's selection and the prompts it reads: CODA's α (B, size) with the
        components (earlier experiences' detached while training), else the prompt ids
        (B, top) with the pool. Sets ``last_selected`` and ``last_pull``; counts usage
        while training."""
        if self.kind == "coda":
            a = self._coda_weights(q)
            P = self.prompts
            g = self.group(self.experience if self.training else self.experiences)
            if self.training and g.start > 0:
                P = torch.cat([P[:g.start].detach(), P[g.start:]])
            self.last_selected, self.last_pull = a.detach(), None
            return a, P
        idx, cos = self._select(q)
        self.last_selected = idx.detach()
        self.last_pull = cos.sum(1).mean()
        if self.training:
            self.usage[self.experience].index_add_(
                0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device))
        return idx, self.prompts

    def prompt_embeds(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, n_virtual, d) the prompt of every row (sets ``last_pull`` and
        ``last_selected``; counts usage while training)."""
        q = self.query(input_ids, attention_mask)
        B, d = q.shape[0], self.backbone.config.hidden_size
        sel, P = self._pick(q)
        if self.kind == "coda":
            return torch.einsum("bm,mld->bld", sel.to(P.dtype), P)
        e = P[sel].reshape(B, self.top * self.length, d)
        if self.kind == "dual":
            e = torch.cat([self.g_prompt[None].expand(B, -1, -1), e], 1)
        return e

    # -------------------------------------------------------------------- protocol
    def _inputs(self, input_ids, attention_mask):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.backbone.get_input_embeddings()(input_ids)
        pe = self.prompt_embeds(input_ids, attention_mask).to(emb.dtype)
        P = pe.shape[1]
        ctx = getattr(self.backbone.config, "max_position_embeddings", None)
        if ctx and P + input_ids.shape[1] > ctx:
            raise FactlabError(f"prompt pool: {P} prompt positions + {input_ids.shape[1]} "
                               f"input positions exceed the model's context ({ctx}); "
                               f"shorten the prompts (length, top)")
        x = torch.cat([pe, emb], 1)
        m = torch.cat([attention_mask.new_ones((input_ids.shape[0], P)), attention_mask], 1)
        return x, m, P

    def _prefixed(self, input_ids, attention_mask):
        """(cache, mask over prefix + input, the input's positions) for ``prefix``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        P = self.n_virtual
        ctx = getattr(self.backbone.config, "max_position_embeddings", None)
        if ctx and P + input_ids.shape[1] > ctx:
            raise FactlabError(f"prompt pool: {P} prefix positions + {input_ids.shape[1]} "
                               f"input positions exceed the model's context ({ctx}); "
                               f"shorten the prompts (length, top)")
        cache = self.prefix_cache(input_ids, attention_mask)
        m = torch.cat([attention_mask.new_ones((input_ids.shape[0], P)), attention_mask], 1)
        pos = (m.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        return cache, m, pos

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """The backbone on [prompt; input]: logits of the input's positions only when the
        head computes them all (the loop's loss and the scorer select target positions
        and skip the prompt's). ``prefix``: the input after a key/value prefix."""
        kwargs.pop("position_ids", None)
        if self.placement == "prefix":
            cache, m, pos = self._prefixed(input_ids, attention_mask)
            kwargs.pop("use_cache", None)
            with self.active():
                return self.backbone(input_ids=input_ids, attention_mask=m, position_ids=pos,
                                     **{self._cache_name: cache}, use_cache=True, **kwargs)
        x, m, P = self._inputs(input_ids, attention_mask)
        pos = (m.long().cumsum(-1) - 1).clamp(min=0)
        with self.active():
            out = self.backbone(inputs_embeds=x, attention_mask=m, position_ids=pos, **kwargs)
        lg = getattr(out, "logits", None)
        if lg is not None and lg.dim() == 3 and lg.shape[1] == x.shape[1]:
            out.logits = lg[:, P:]
        return out

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """HF generation from [prompt; input] embeddings; returns input ids + new ids
        (the protocol ``factlab.evaluate.generate`` reads)."""
        if self.placement == "prefix":
            cache, m, _ = self._prefixed(input_ids, attention_mask)
            P = m.shape[1] - input_ids.shape[1]
            # the cache holds the prefix's P positions: HF reads the ids after them
            ids = torch.cat([input_ids.new_zeros((input_ids.shape[0], P)), input_ids], 1)
            with self.active():
                out = self.backbone.generate(input_ids=ids, attention_mask=m,
                                             **{self._cache_name: cache}, **kwargs)
            return out[:, P:]
        x, m, _ = self._inputs(input_ids, attention_mask)
        with self.active():
            new = self.backbone.generate(inputs_embeds=x, attention_mask=m, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)

    # ------------------------------------------------------------------- parameters
    def trainable(self) -> list[nn.Parameter]:
        ps = [self.prompts, self.keys]
        if self.kind == "dual":
            ps.append(self.g_prompt)
        if self.kind == "coda":
            ps.append(self.attention)
        return ps

    def start_experience(self, t: int) -> None:
        """Experience t trains now; CODA: its new components start orthogonal to the
        earlier experiences' (keys and prompt directions)."""
        if t > self.experiences:
            raise FactlabError(f"prompt pool built for {self.experiences} experiences, asked "
                               f"to train experience {t}")
        if self.kind == "coda" and t > 1 and not bool(self.started[t]):
            g = self.group(t)
            d = self.keys.shape[1]
            gen = torch.Generator().manual_seed(self.seed * 7919 + t)
            if g.stop <= d:
                with torch.no_grad():
                    self.keys[g.start:g.stop] = _orthogonal_rows(
                        len(g), d, self.keys[:g.start].detach().cpu(), gen).to(self.keys)
        self.started[t] = True
        self.experience = int(t)

    def wrapper_config(self) -> dict:
        return {"kind": self.kind, "size": self.size, "top": self.top, "length": self.length,
                "g_length": self.g_length, "layer": self.layer, "pool": self.pool,
                "name_ids": self.name_ids, "diversify": self.diversify, "masks": self.masks,
                "experiences": self.experiences, "seed": self.seed,
                "placement": self.placement}


@torch.no_grad()
def selections(model: PromptPool, tokenizer, texts: list[str], *, batch_size: int = 128):
    """The prompts every text selects at test time: (n, top) ids (CODA: (n, size) α)."""
    was = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(texts), batch_size):
            enc = [tokenizer(t)["input_ids"] for t in texts[lo:lo + batch_size]]
            L = max(len(e) for e in enc)
            ids = torch.zeros(len(enc), L, dtype=torch.long)
            am = torch.zeros(len(enc), L, dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, :len(e)] = torch.tensor(e)
                am[r, :len(e)] = 1
            pick = model.prefix_cache if model.placement == "prefix" else model.prompt_embeds
            pick(ids.to(model.device), am.to(model.device))
            out.append(model.last_selected.cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.top, dtype=torch.long)


def matching_rate(selected: torch.Tensor, usage: torch.Tensor, experience) -> float | None:
    """Mean over facts of |selected ∩ prompts of the fact's experience| / top, where the
    prompts of experience t are the ``top`` it selected most in training (``usage[t]``);
    facts of experience 0 (the base world: no prompt trained on it) are left out."""
    exp = torch.as_tensor(experience)
    keep = exp > 0
    if not bool(keep.any()):
        return None
    top = selected.shape[1]
    own = {int(t): set(usage[int(t)].topk(top).indices.tolist())
           for t in exp[keep].unique().tolist()}
    hits = [len(set(s) & own[int(t)]) / top for s, t in zip(selected[keep].tolist(),
                                                            exp[keep].tolist())]
    return float(sum(hits) / len(hits))


class PromptLearning(Plugin):
    """Train a :class:`PromptPool` over the frozen model, experience by experience (module
    doc). ``names``: the entities' names (for the default name-pooled query); ``lam``: the
    key-pull weight λ; the rest is :class:`PromptPool`'s. ``experiences`` defaults to the
    driver's."""

    name = "prompt_pool"

    def __init__(self, *, kind: str = "l2p", size: int = 10, top: int = 5, length: int = 5,
                 g_length: int = 5, layer: int | None = None, pool: str = "name",
                 names: list[str] | None = None, lam: float = 0.1, diversify: bool = False,
                 masks: str | None = None, experiences: int | None = None, seed: int = 0,
                 placement: str = "input"):
        if lam < 0:
            raise FactlabError(f"prompt pool: lam must be >= 0, got {lam}")
        self.kw = dict(kind=kind, size=size, top=top, length=length, g_length=g_length,
                       layer=layer, pool=pool, diversify=diversify, masks=masks, seed=seed,
                       placement=placement)
        self.names, self.lam, self.n_exp = names, float(lam), experiences

    def setup(self, loop) -> None:
        if not isinstance(loop.model, PromptPool):
            name_ids = None
            if self.kw["pool"] == "name":
                if not self.names:
                    raise FactlabError("prompt pool: pool='name' needs names=[...]")
                name_ids = NameIndex.from_names(loop.tokenizer, self.names).ids
            T = self.n_exp or getattr(getattr(loop, "driver", None), "T", None) or 1
            loop.model = PromptPool(loop.model, name_ids=[list(s) for s in name_ids or []],
                                    experiences=T, **self.kw)
        t = int(getattr(loop, "experience", None) or 1)
        loop.model.start_experience(t)

    def trainable(self, loop):
        m = loop.model
        if not isinstance(m, PromptPool):
            return None
        return [{"params": m.trainable(), "weight_decay": 0.0, "name": "prompt pool"}]

    def extra_loss(self, loop, batch: dict, out):
        m = loop.model
        if self.lam == 0 or not isinstance(m, PromptPool) or m.last_pull is None:
            return None
        return -self.lam * m.last_pull
