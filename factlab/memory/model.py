"""A frozen backbone with product-key memory banks added to some of its layers.

Each bank reads a decoder layer's output hidden states and adds its output to them
(additively, on the residual stream), at the layers given or by default at about 1/4,
1/2 and 3/4 of the depth. Value rows start at zero, so before tuning the wrapped model
equals the backbone exactly. An optional relevance gate (a sigmoid of a linear read of the
hidden state, per position) scales each bank's output: trained with negative examples
(``MemoryTuning(negatives=...)``) it learns to stay shut on the negatives and, measured,
on little else. ``gate="keys"`` is the key gate (``factlab.memory.gate``): a codebook of the
backbone's own states at the end of each stored question, read at the lowest memory layer
before anything is added; the banks act only from the position where a stored question
matches (cosine >= radius) to the end of the sequence, and add nothing elsewhere (closed,
the model is the backbone exactly). During cached generation the open/closed state of
each row carries over from the prompt's forward to the steps after it. ``gate="entity"``
(``factlab.memory.entity``, with ``routing="key"``) opens instead where a stored entity's
name was read and a stored relation is asked, however the question is phrased, and reads
that fact's rows. The backbone is held by reference (``factlab.model.wrapper.FrozenBackbone``) and
never copied; ``save_pretrained`` writes only the banks (+ the backbone's path and hash).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from factlab.errors import FactlabError
from factlab.memory.bank import ProductKeyMemory
from factlab.memory.entity import EntityGate, running_best
from factlab.memory.gate import KeyGate
from factlab.model.layers import decoder_layers  # noqa: F401 (re-exported)
from factlab.model.wrapper import FrozenBackbone


def default_layers(n_layers: int) -> list[int]:
    """About 1/4, 1/2 and 3/4 of the depth (distinct, in range)."""
    return sorted({min(n_layers - 1, max(0, round(f * n_layers) - 1)) for f in (0.25, 0.5, 0.75)})


class _Captured(Exception):
    """Ends a forward once the wanted layers' states are read."""


def prompt_tokens(enc) -> list:
    """Every encoded question's prompt tokens (before its answer)."""
    return [enc.example(q)[:int(enc.answer_start[q])] for q in range(len(enc))]


def right_padded(prompts, device=None):
    """Token arrays as one right-padded batch (causal: the pads come after) and its
    attention mask."""
    L = max(len(p) for p in prompts)
    x = torch.zeros(len(prompts), L, dtype=torch.long)
    am = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, :len(p)] = torch.as_tensor(np.asarray(p, np.int64))
        am[r, :len(p)] = 1
    return x.to(device), am.to(device)


class MemoryModel(FrozenBackbone):
    def __init__(self, backbone, *, layers: list[int] | None = None, n_keys: int = 256,
                 heads: int = 4, topk: int = 32, key_dim: int = 64, routing: str = "pinned",
                 span: int = 64,
                 gate: bool | str | None = False, radius: float = 0.98,
                 query: str | None = None,
                 null: float | None = None, seed: int = 0, experts: str = "values",
                 backbone_path: str | None = None,
                 backbone_train: bool = False, prompt_format: str = "plain",
                 key_index: str = "exact", entity_layer: int | None = None,
                 relation_layer: int | None = None):
        super().__init__(backbone, backbone_path=backbone_path, backbone_train=backbone_train)
        if prompt_format not in ("plain", "chat"):
            raise FactlabError(f"memory prompt_format={prompt_format!r}: plain or chat")
        # how the stored questions were put to the backbone (factlab.tokens.prompts): a
        # question asked another way does not reach the same key
        self.prompt_format = prompt_format
        blocks = decoder_layers(backbone)
        gate = {True: "learned", False: None, "none": None}.get(gate, gate)
        if layers is None:  # with a key gate: at the head's input (see the module doc)
            layers = ["head"] if gate in ("keys", "entity") else default_layers(len(blocks))
        layers = [x if x == "head" else int(x) for x in layers]
        ints = [x for x in layers if x != "head"]
        bad = [x for x in ints if not 0 <= x < len(blocks)]
        if bad or not layers or len(set(layers)) != len(layers):
            raise FactlabError(f"memory layers {layers}: need distinct layer indices in "
                               f"[0, {len(blocks)}) or 'head'")
        d = backbone.config.hidden_size
        if gate not in (None, "learned", "keys", "entity"):
            raise FactlabError(f"memory gate={gate!r}: choose none, learned, keys or entity")
        if gate == "entity" and routing != "key":
            raise FactlabError("memory gate='entity' reads the matched fact's own rows: it "
                               "needs routing='key'")
        self._gated = gate in ("keys", "entity")  # the banks act only where a gate opened
        self.layers, self.gate_kind = layers, gate
        query = query or ("state+question" if gate == "keys" else "state")
        if query not in ("state", "state+question") or (query != "state" and gate != "keys"):
            raise FactlabError(f"memory query={query!r}: 'state', or 'state+question' with "
                               f"gate='keys'")
        self.query = query
        self.gate = gate == "learned"  # the learned sigmoid gate
        if routing == "key" and not self._gated:
            raise FactlabError("memory routing='key' (each stored question its own slots) "
                               "needs gate='keys' or 'entity'")
        if routing == "key" and not 1 <= span <= n_keys * n_keys:
            raise FactlabError(f"memory span={span}: must be in [1, {n_keys * n_keys}]")
        self.span = int(span)  # key routing: slots per stored question (answer positions)
        if routing == "key" and experts != "values":
            raise FactlabError("memory experts='peer' selects experts by product keys; "
                               "routing='key' reads one row per position: choose one")
        self.kw = dict(n_keys=n_keys, heads=heads, topk=topk, key_dim=key_dim, routing=routing,
                       null=null, experts=experts)
        self.seed = seed
        # key routing reads no query: its banks' (unused) routers stay frozen
        bank_kw = {**self.kw, "routing": "hash" if routing == "key" else routing}
        self.banks = nn.ModuleList(
            ProductKeyMemory(2 * d if query == "state+question" else d, d, seed=seed + 1000 * i,
                             **bank_kw) for i in range(len(layers)))
        if self.gate:
            self.gates = nn.ModuleList(nn.Linear(d, 1) for _ in layers)
            for g in self.gates:  # starts half open; zero values keep the output exact
                nn.init.zeros_(g.weight)
                nn.init.zeros_(g.bias)
        if key_index != "exact" and gate != "keys":
            raise FactlabError(f"memory key_index={key_index!r} searches the key gate's keys: "
                               f"it needs gate='keys'")
        # the key gate's nearest-key search: exact, or a FAISS index (memory/gate.py)
        self.keygate = KeyGate(d, radius, index=key_index) if gate == "keys" else None
        self.key_layer = min(ints) if ints else len(blocks) - 1
        self.entgate, self.entity_layer = None, None
        if gate == "entity":
            n = len(blocks)
            self.key_layer = n - 1 if relation_layer is None else int(relation_layer)
            # by default 0.3 of the depth: on SmolLM2 (30 layers) layer 9 opened the most
            # held-out paraphrases with no validation negative open (settings search on
            # seed 1's facts, docs/memory.md)
            self.entity_layer = int(0.3 * n) if entity_layer is None else int(entity_layer)
            if not 0 <= self.entity_layer <= self.key_layer < n:
                raise FactlabError(f"memory gate='entity': need 0 <= entity_layer "
                                   f"({self.entity_layer}) <= relation_layer "
                                   f"({self.key_layer}) < {n}")
            if any(x <= self.key_layer for x in ints):
                raise FactlabError(f"memory gate='entity': banks must sit after the relation "
                                   f"layer {self.key_layer} (layers {layers}; 'head' is)")
            self.entgate = EntityGate(d)
        self._ent = None  # entity gate: running best entity score / key per relation
        self._call: dict = {}  # per forward: fresh sequence?, attention mask
        self._open = None  # (B, T) bool: where the key gate lets the banks act
        self._carry = None  # (B,) bool: each row's gate at its last position
        self._qstate = None  # (B, d): the state of the question that opened each row's gate
        self._kslot = None  # key routing: (B, T) slot of every position (-1: none)
        self._kid = None  # (B,): the stored question that opened each row's gate
        self._koff = None  # (B,): the offset from it of each row's last position
        self.last_route: dict[int, tuple] = {}
        self.record_routes = False
        dev = next(backbone.parameters()).device
        super()._apply(lambda t: t.to(dev))  # the banks where the backbone is (fp32)
        for i, li in enumerate(layers):
            if li == "head":
                head = backbone.get_output_embeddings()
                if head is None:
                    raise FactlabError("memory layers ['head']: the backbone has no output "
                                       "embedding module")
                self._hooks.append(head.register_forward_pre_hook(
                    functools.partial(self._head_in, i)))
            else:
                self.add_hook(blocks[li], functools.partial(self._add, i))
        if self._gated and self.key_layer not in ints:
            self.add_hook(blocks[self.key_layer], self._key_state)
        if self.entgate is not None and self.entity_layer != self.key_layer:
            self.add_hook(blocks[self.entity_layer], self._entity_state)
        self._hooks.append(backbone.register_forward_pre_hook(self._pre, with_kwargs=True))

    def _pre(self, module, args, kwargs):
        """Before each backbone call: is this the start of the sequences (no cache yet) or
        a cached continuation (generation steps)?"""
        if not self._active:
            return None
        # the KV cache (``past_key_values``, or ``cache`` in newer transformers): empty or
        # absent at the start of a sequence
        caches = [v for v in kwargs.values() if hasattr(v, "get_seq_length")]
        cp = kwargs.get("cache_position")
        if caches:
            fresh = int(caches[0].get_seq_length()) == 0
        elif cp is not None and cp.numel():
            fresh = int(cp.reshape(-1)[0]) == 0
        else:
            fresh = kwargs.get("past_key_values") is None
        self._call = {"fresh": fresh, "mask": kwargs.get("attention_mask"),
                      "ids": kwargs.get("input_ids")}
        return None

    def _pad(self, h):
        """(B, T) bool: the padding positions of this call (none if no mask)."""
        mask = self._call.get("mask")
        if mask is not None and mask.shape[-1] >= h.shape[1]:
            return mask[:, -h.shape[1]:] == 0
        return torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)

    def _entity_state(self, module, args, output):
        """The entity layer's output: the running best entity score and key of every
        position, per relation (a fresh forward only: generation steps open nothing)."""
        h = output[0] if isinstance(output, tuple) else output
        if not self._call.get("fresh", True):
            self._ent = None
            return None
        best, arg = self.entgate.entity_scores(h)
        best = best.masked_fill(self._pad(h)[..., None], -1.0)  # padding never matches
        self._ent = running_best(best, arg)
        return None

    def _hits(self, h):
        """(B, T) bool where a gate matches, and the stored key it matches there."""
        fresh = self._call.get("fresh", True)
        if self.entgate is not None:
            if not fresh or self._ent is None or not len(self.entgate):
                return (torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device),
                        torch.full(h.shape[:2], -1, dtype=torch.long, device=h.device))
            hit, kid = self.entgate.decide(*self._ent, self.entgate.relation_logits(h))
            ids = self._call.get("ids")
            if ids is None or ids.shape[1] != h.shape[1]:
                raise FactlabError("memory gate='entity' reads the input ids (where an answer "
                                   "begins): call the model with input_ids")
            return hit & ~self._pad(h) & self.entgate.at_suffix(ids), kid
        s, kid = self.keygate.match(h, index=True)
        s = s.masked_fill(self._pad(h), -1.0)  # padding never matches
        return s >= self.keygate.radius, kid

    def _gate_open(self, h) -> torch.Tensor:
        """(B, T) bool: open from the first position matching a stored key on."""
        hit, kid = self._hits(h)
        fresh = self._call.get("fresh", True)
        B = h.shape[0]
        if fresh:
            carry = torch.zeros(B, dtype=torch.bool, device=h.device)
            qprev = torch.zeros(B, h.shape[-1], dtype=h.dtype, device=h.device)
        else:
            if self._carry is None or self._carry.shape[0] != B:
                raise FactlabError("memory key gate: a cached continuation of a batch this "
                                   "model did not see start (batch size changed)")
            carry, qprev = self._carry, self._qstate
        # the question's state: where the gate first opened (kept through generation)
        first = hit.int().argmax(1)
        qnew = h[torch.arange(B, device=h.device), first].detach()
        self._qstate = torch.where(carry[:, None], qprev,
                                   qnew * hit.any(1)[:, None].to(h.dtype))
        run = (hit | carry[:, None]).int().cummax(dim=1).values.bool()
        if self.kw["routing"] == "key":  # slot = the opening key's base + the offset from it
            T = h.shape[1]
            pos = torch.arange(T, device=h.device)[None]
            if fresh or self._kid is None:
                kprev = torch.full((B,), -1, dtype=torch.long, device=h.device)
                oprev = torch.zeros(B, dtype=torch.long, device=h.device)
            else:
                kprev, oprev = self._kid, self._koff
            knew = kid[torch.arange(B, device=h.device), first]
            k = torch.where(carry, kprev, torch.where(hit.any(1), knew, -1))
            off = torch.where(carry[:, None], oprev[:, None] + 1 + pos, pos - first[:, None])
            ok = run & (off < self.span) & (k[:, None] >= 0)
            self._kslot = torch.where(ok, k[:, None] * self.span + off, -1)
            self._kid, self._koff = k, off[:, -1]
        self._carry = run[:, -1]
        return run

    def _bank_input(self, h):
        """What a bank's query reads: the position's state, and with
        ``query="state+question"`` the state of the question that opened the gate."""
        if self.query != "state+question":
            return h
        q = self._qstate
        if self.keygate is not None and self.keygate.fitted:  # centred, whitened by the
            # stored questions' statistics
            q = (q.float() - self.keygate.mean) @ self.keygate.whiten
            q = q * (self._qstate.abs().sum(-1, keepdim=True) > 0)  # closed rows stay zero
        return torch.cat([h, q[:, None].expand(-1, h.shape[1], -1).to(h.dtype)], -1)

    def _key_state(self, module, args, output):
        """The key layer's output, where no bank sits: read it (the gate), change
        nothing."""
        h = output[0] if isinstance(output, tuple) else output
        if self.entgate is not None and self.entity_layer == self.key_layer:
            self._entity_state(module, args, output)
        self._open = self._gate_open(h)
        return None

    def _add(self, i, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if self._gated and self.layers[i] == self.key_layer:
            self._key_state(module, args, output)
        h2 = self._with_bank(i, h)
        if h2 is None:
            return None
        return (h2,) + tuple(output[1:]) if isinstance(output, tuple) else h2

    def _head_in(self, i, module, args):
        """A bank at the output head's input (after the final norm): its output moves the
        logits directly, unbounded by the final norm."""
        if not self._active:
            return None
        h2 = self._with_bank(i, args[0])
        return None if h2 is None else (h2,) + tuple(args[1:])

    def _with_bank(self, i, h):
        """``h`` plus bank ``i``'s output (None: unchanged)."""
        bank = self.banks[i]
        open_ = None
        if self._gated:
            open_ = self._open[:, -h.shape[1]:]  # the head may see the last positions only
        if self.kw["routing"] == "key":
            return self._with_key_slots(i, h)
        x = self._bank_input(h) if open_ is not None else h
        if self.record_routes:
            m, scores, idx = bank(x, return_route=True)
            self.last_route[i] = (scores.detach(), idx.detach())
            if open_ is not None:
                m = m * open_[..., None]
        elif open_ is not None:
            if not bool(open_.any()):
                return None  # closed everywhere: the backbone's output, untouched
            sel = open_.reshape(-1).nonzero().squeeze(-1)
            flat = x.reshape(-1, x.shape[-1])
            m = torch.zeros(flat.shape[0], bank.d_out, dtype=h.dtype, device=h.device)
            m = m.index_copy(0, sel, bank(flat.index_select(0, sel)).to(h.dtype))
            m = m.view(*h.shape[:-1], bank.d_out)
        else:
            m = bank(h)
        if self.gate:
            m = m * torch.sigmoid(self.gates[i](h.to(self.gates[i].weight.dtype)))
        return h + m.to(h.dtype)

    def _with_key_slots(self, i, h):
        """Key routing: every open position reads the one value row of (its stored
        question, its offset from that question's end): no two stored questions share a
        row (Lamini's reference code's one slot per fact, here one row per answer
        position)."""
        slot = self._kslot[:, -h.shape[1]:]
        bank = self.banks[i]
        if self.record_routes:
            self.last_route[i] = (torch.ones(*slot.shape, 1, 1), slot.reshape(-1, 1, 1))
        sel = (slot >= 0).reshape(-1).nonzero().squeeze(-1)
        if not len(sel):
            return None
        flat = h.reshape(-1, h.shape[-1])
        rows = bank.values(slot.reshape(-1, 1).index_select(0, sel))
        m = torch.zeros(flat.shape[0], bank.d_out, dtype=h.dtype, device=h.device)
        m = m.index_copy(0, sel, rows.to(h.dtype)).view(*h.shape[:-1], bank.d_out)
        return h + m

    # ------------------------------------------------------------------ the key gate
    def _question_states(self, enc, batch_size: int = 256) -> torch.Tensor:
        """The key layer's state at the last prompt token of every encoded question
        (the banks closed while it is read), (Q, d)."""
        prompts = prompt_tokens(enc)
        return self.layer_states(prompts, {self.key_layer: [[len(p) - 1] for p in prompts]},
                                 batch_size)[self.key_layer]

    def write_keys(self, enc, only_new: bool = True) -> int:
        """Store the questions of ``enc`` (an ``EncodedQA``) in the key gate; with
        ``only_new`` a question already stored (cosine > 1 - 1e-5) is not stored twice.
        Returns how many keys were added."""
        if self.keygate is None:
            raise FactlabError("write_keys: this memory model has no key gate (gate='keys')")
        h = self._question_states(enc)
        if not self.keygate.fitted and len(h) >= 16:
            self.keygate.fit(h)  # once: later writes keep the earlier facts' queries
        if only_new and len(self.keygate):
            h = h[self.keygate.match(h) < 1 - 1e-5]
        if self.kw["routing"] == "key" and (len(self.keygate) + len(h)) * self.span > \
                self.banks[0].slots:
            raise FactlabError(f"memory bank full: {len(self.keygate) + len(h):,} stored "
                               f"questions x span {self.span} slots need more than the bank's "
                               f"{self.banks[0].slots:,} (raise n_keys)")
        self.keygate.add(h)
        return int(h.shape[0])

    def fit_queries(self, enc) -> None:
        """Fix the bank queries' whitening by the states of the questions of ``enc``
        (background questions of the stored kind, e.g. the stored relation about names
        never stored) before any key is written: then single-fact writes, which have no
        statistics of their own, all read queries whitened alike."""
        if self.keygate is None:
            raise FactlabError("fit_queries: this memory model has no key gate (gate='keys')")
        if len(self.keygate):
            raise FactlabError("fit_queries: keys are already stored; their queries would "
                               "change")
        h = self._question_states(enc)
        if len(h) < 16:
            raise FactlabError(f"fit_queries: {len(h)} questions; the whitening needs >= 16")
        self.keygate.fit(h)

    def key_states(self, enc) -> torch.Tensor:
        """The key layer's states at the end of every question of ``enc`` (what the key
        gate compares with its keys), (Q, d)."""
        return self._question_states(enc)

    def question_scores(self, enc) -> np.ndarray:
        """For every encoded question: the nearest stored key's cosine to its state (1 for
        a stored question asked as stored). The bank's confidence that it holds it."""
        if self.keygate is None:
            raise FactlabError("question_scores: this memory model has no key gate")
        return self.keygate.match(self._question_states(enc)).cpu().numpy()

    # --------------------------------------------------------------- the entity gate
    def layer_states(self, prompts, picks: dict, batch_size: int = 64) -> dict:
        """The backbone's own states (no bank acts) at chosen positions of ``prompts``
        (token arrays): ``picks[layer][q]`` the positions of prompt q to read at the output
        of decoder layer ``layer`` (None: every position). Returns {layer: (n, d) fp32},
        rows in prompt order, then position order."""
        blocks = decoder_layers(self.backbone)
        layers = sorted(picks)
        out: dict = {k: [] for k in layers}
        for s in range(0, len(prompts), batch_size):
            idx = range(s, min(len(prompts), s + batch_size))
            x, am = right_padded([prompts[q] for q in idx], self.device)
            got: dict = {}

            def grab(layer, mod, args, output):
                got[layer] = (output[0] if isinstance(output, tuple) else output).detach()
                if layer == layers[-1]:
                    raise _Captured  # the rest of the forward is not needed

            hs = [blocks[k].register_forward_hook(functools.partial(grab, k)) for k in layers]
            try:
                with torch.no_grad():
                    self.backbone(input_ids=x, attention_mask=am)
            except _Captured:
                pass
            finally:
                for hk in hs:
                    hk.remove()
            for k in layers:
                for r, q in enumerate(idx):
                    p = picks[k][q]
                    pos = torch.arange(len(prompts[q])) if p is None else \
                        torch.as_tensor(np.asarray(p, np.int64))
                    out[k].append(got[k][r, pos.to(got[k].device)].float().cpu())
        d = self.config.hidden_size
        return {k: torch.cat(v) if v else torch.zeros(0, d) for k, v in out.items()}

    def entity_scores(self, prompts, batch_size: int = 64) -> np.ndarray:
        """Per prompt: the entity gate's best entity-key cosine over its positions and
        relations (how surely it names a stored entity: the abstention score)."""
        h = self.layer_states(prompts, {self.entity_layer: [None] * len(prompts)}, batch_size)
        best, _ = self.entgate.entity_scores(h[self.entity_layer])
        lens = np.fromiter((len(p) for p in prompts), np.int64, len(prompts))
        per = best.max(-1).values.numpy()
        return np.array([per[a:b].max() for a, b in
                         zip(np.r_[0, np.cumsum(lens)[:-1]], np.cumsum(lens))])

    @torch.no_grad()
    def openings(self, prompts, batch_size: int = 64):
        """Where the gate opens on each prompt (the first open position, -1: shut) and the
        stored key it reads there (-1: none)."""
        if not self._gated or self.kw["routing"] != "key":
            raise FactlabError("openings: a memory model with key routing and a gate")
        pos, kid = [], []
        for s in range(0, len(prompts), batch_size):
            x, am = right_padded(prompts[s:s + batch_size], self.device)
            self.forward(input_ids=x, attention_mask=am)
            o = self._open & am.bool()
            first = o.int().argmax(1)
            pos += torch.where(o.any(1), first, -1).tolist()
            kid += torch.where(o.any(1), self._kid, -1).tolist()
        return np.array(pos, np.int64), np.array(kid, np.int64)

    @property
    def radius(self) -> float | None:
        return None if self.keygate is None else self.keygate.radius

    @radius.setter
    def radius(self, r: float) -> None:
        if self.keygate is None:
            raise FactlabError("radius: this memory model has no key gate")
        self.keygate.radius = float(r)

    # --------------------------------------------------------------- parameter groups
    def value_parameters(self) -> list[nn.Parameter]:
        return [b.values.weight for b in self.banks]

    def expert_parameters(self) -> list[nn.Parameter]:
        """PEER experts' down vectors (sparse rows; none without ``experts='peer'``)."""
        return [b.down.weight for b in self.banks if b.down is not None]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.banks for p in b.router_parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters()) if self.gate else []

    def freeze_routing(self) -> None:
        for b in self.banks:
            b.router_parameters_frozen(True)

    def zero_bank(self) -> None:
        """Erase every stored value (what the bank holds, gone): recall must fall back to
        the backbone's."""
        with torch.no_grad():
            for p in self.value_parameters():
                p.zero_()

    @property
    def slots(self) -> int:
        return sum(b.slots for b in self.banks)

    @torch.no_grad()
    def routes(self, input_ids, attention_mask=None) -> dict[int, torch.Tensor]:
        """The slot indices (T, H, k) every bank selects at every position of a batch."""
        self.record_routes = True
        try:
            self.forward(input_ids=input_ids, attention_mask=attention_mask)
            return {i: r[1].view(*input_ids.shape, *r[1].shape[1:])
                    for i, r in self.last_route.items()}
        finally:
            self.record_routes = False
            self.last_route = {}

    # -------------------------------------------------------------------- persistence
    def wrapper_config(self) -> dict:
        return {"layers": self.layers, "gate": self.gate_kind or False, "seed": self.seed,
                "radius": self.radius if self.keygate is not None else 0.98,
                "query": self.query, "span": self.span, "prompt_format": self.prompt_format,
                "key_index": self.keygate.search if self.keygate is not None else "exact",
                "entity_layer": self.entity_layer, "relation_layer":
                    self.key_layer if self.entgate is not None else None,
                **self.kw}
