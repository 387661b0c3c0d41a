"""A product-key memory (Lample et al. 2019): N = n² value slots addressed by a query.

For each of ``heads`` heads a query q (normalised) is split in two halves; each half is
scored against its own n sub-keys, the top k of each half are kept, and the k² sums of the
two scores contain the exact top k of all N = n² slots (a slot's score is the sum of its
two half-scores, and a slot in the overall top k must be in the top k of each half).
Cost per query: O(n·d + k²) instead of O(N·d). The k selected scores go through an fp32
softmax and weight the selected value rows, gathered with ``embedding_bag`` (sum, per-sample
weights, ``sparse=True``): only touched rows get a gradient, so the values can be trained
by a sparse-row optimizer (``factlab.train.optim``) whose state is O(N), not O(N·width).

Value rows start at zero, so a bank adds exactly nothing until it is tuned (a wrapped
model equals its backbone bit for bit). Routing (the query projection and the keys) is
``learned`` (trains with the values), ``pinned`` (trains for a while, then frozen so a fact
always hits the same slots) or ``hash`` (frozen at its seeded random init from the start:
a deterministic, locality-sensitive hash of the hidden state).

``experts="peer"`` makes every slot a singleton expert (He 2024, "Mixture of A Million
Experts", PEER): slot i holds a down vector u_i (d_in) besides its value v_i (d_out), and a
selected slot adds ``w_i * gelu(u_i . x) * v_i`` instead of ``w_i * v_i`` (x at unit RMS),
so what a slot writes depends on the input, not only on whether it was selected. The u
rows are gathered with a sparse embedding (only the selected rows get a gradient; they
train in their own sparse group at their own lr); v starts at zero, so the bank still adds
exactly nothing before tuning.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from factlab.errors import FactlabError

ROUTINGS = ("learned", "pinned", "hash")
EXPERTS = ("values", "peer")


class ProductKeyMemory(nn.Module):
    def __init__(self, d_in: int, d_out: int, *, n_keys: int = 256, heads: int = 4,
                 topk: int = 32, key_dim: int = 64, routing: str = "learned", seed: int = 0,
                 null: float | None = None, experts: str = "values"):
        super().__init__()
        if experts not in EXPERTS:
            raise FactlabError(f"experts={experts!r}: choose one of {', '.join(EXPERTS)}")
        if routing not in ROUTINGS:
            raise FactlabError(f"routing={routing!r}: choose one of {', '.join(ROUTINGS)}")
        if key_dim % 2 or key_dim < 2:
            raise FactlabError(f"key_dim must be even and >= 2, got {key_dim}")
        if not 1 <= topk <= n_keys:
            raise FactlabError(f"topk must be in [1, n_keys={n_keys}], got {topk}")
        if heads < 1:
            raise FactlabError(f"heads must be >= 1, got {heads}")
        self.d_in, self.d_out, self.n_keys, self.heads = d_in, d_out, n_keys, heads
        self.topk, self.key_dim, self.routing, self.seed = topk, key_dim, routing, seed
        g = torch.Generator().manual_seed(seed)
        half = key_dim // 2
        self.query = nn.Linear(d_in, heads * key_dim, bias=False)
        with torch.no_grad():
            self.query.weight.copy_(torch.randn(heads * key_dim, d_in, generator=g) / math.sqrt(d_in))
        self.keys = nn.Parameter(torch.randn(heads, 2, n_keys, half, generator=g) / math.sqrt(half))
        # an optional "null slot" per head with a learned score and a zero value: a query
        # that matches no key better than it sends its weight to nothing
        self.null = nn.Parameter(torch.full((heads,), float(null))) if null is not None else None
        self.values = nn.EmbeddingBag(n_keys * n_keys, d_out, mode="sum", sparse=True)
        nn.init.zeros_(self.values.weight)
        self.experts = experts
        self.down = None
        if experts == "peer":  # the singleton experts' input vectors u_i
            self.down = nn.Embedding(n_keys * n_keys, d_in, sparse=True)
            with torch.no_grad():
                self.down.weight.copy_(torch.randn(n_keys * n_keys, d_in, generator=g) /
                                       math.sqrt(d_in))
        if routing == "hash":
            self.router_parameters_frozen(True)

    @property
    def slots(self) -> int:
        return self.n_keys * self.n_keys

    def router_parameters(self):
        return [self.query.weight, self.keys] + ([self.null] if self.null is not None else [])

    def router_parameters_frozen(self, frozen: bool = True) -> None:
        for p in self.router_parameters():
            p.requires_grad_(not frozen)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (T, d_in) -> (scores (T, H, k) fp32, slot indices (T, H, k) int64), best
        first."""
        T, H, k, n = x.shape[0], self.heads, self.topk, self.n_keys
        q = self.query(x.to(self.query.weight.dtype)).view(T, H, self.key_dim).float()
        q = F.layer_norm(q, (self.key_dim,))  # query normalisation, no affine
        q1, q2 = q.chunk(2, dim=-1)
        keys = self.keys.float()
        s1 = torch.einsum("thd,hnd->thn", q1, keys[:, 0])
        s2 = torch.einsum("thd,hnd->thn", q2, keys[:, 1])
        v1, i1 = s1.topk(k, dim=-1)
        v2, i2 = s2.topk(k, dim=-1)
        cand = (v1[..., :, None] + v2[..., None, :]).view(T, H, k * k)
        best, j = cand.topk(k, dim=-1)
        idx = i1.gather(-1, j // k) * n + i2.gather(-1, j % k)
        return best, idx

    def forward(self, x: torch.Tensor, return_route: bool = False):
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        scores, idx = self.route(flat)
        if self.null is not None:
            nul = self.null.float()[None, :, None].expand(scores.shape[0], -1, 1)
            w = torch.softmax(torch.cat([scores, nul], dim=-1), dim=-1)[..., :-1]
        else:
            w = torch.softmax(scores, dim=-1)  # fp32, per head; the heads' outputs add
        T = flat.shape[0]
        w = w.reshape(T, -1)
        if self.down is not None:  # PEER: each selected expert's own activation, on the
            u = self.down(idx.view(T, -1))  # input at unit RMS (u_i . x ~ N(0, 1) at init,
            xf = flat.float()  # whatever the scale of the state it reads)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
            w = w * F.gelu(torch.einsum("tkd,td->tk", u.float(), xf))
        out = self.values(idx.view(T, -1), per_sample_weights=w.to(self.values.weight.dtype))
        out = out.view(*lead, self.d_out)
        return (out, scores, idx) if return_route else out

    def brute_force_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same top k by scoring every slot (O(N·d)): the reference for tests and
        ``bench/memory_lookup.py``."""
        T, H, n = x.shape[0], self.heads, self.n_keys
        q = F.layer_norm(self.query(x).view(T, H, self.key_dim).float(), (self.key_dim,))
        q1, q2 = q.chunk(2, dim=-1)
        s1 = torch.einsum("thd,hnd->thn", q1, self.keys.float()[:, 0])
        s2 = torch.einsum("thd,hnd->thn", q2, self.keys.float()[:, 1])
        full = (s1[..., :, None] + s2[..., None, :]).reshape(T, H, n * n)
        return full.topk(self.topk, dim=-1)


def bank_bytes(slots: int, width: int, *, heads: int = 4, key_dim: int = 64, d_in: int | None = None,
               n_keys: int | None = None, dtype_bytes: int = 4, optimizer: str = "row_adagrad",
               peer: bool = False) -> dict:
    """Bytes of a bank's weights and of its optimizer state (values by the sparse-row
    optimizer, router by dense Adam), before building it: lets a too-large bank fail with
    a clear message instead of an out-of-memory kill. ``peer``: the values include each
    slot's down vector (``d_in`` floats)."""
    n = n_keys or int(round(math.sqrt(slots)))
    d_in = d_in or width
    values = slots * width * dtype_bytes + (slots * d_in * dtype_bytes if peer else 0)
    router = (heads * key_dim * d_in + heads * 2 * n * (key_dim // 2)) * 4
    state = {"row_adagrad": slots * 4 * (2 if peer else 1), "sparse_adam": 2 * values,
             "sgd": 0}[optimizer]
    return {"values": values, "router": router, "optimizer_state": state + 2 * router,
            "total": values + router + state + 2 * router}
