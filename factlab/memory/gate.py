"""The key gate: the memory acts only on questions it holds.

An always-on bank changes the backbone's answers everywhere (``docs/memory.md``: 0-1% of
held-out answers unchanged whatever the routing). The key gate is a codebook of the
backbone's own states at the end of each stored question (GRACE's deferral radius, and
Lamini's reference code's one key per fact): at every position the gate reads the nearest
stored key's cosine to the hidden state there; once a position of a sequence matches
(cosine >= ``radius``) the gate stays open for the rest of the sequence, so the answer
tokens that follow the stored question go through the bank and nothing else does. Closed,
the wrapped model is the backbone bit for bit (the bank's output is not added at all).

The gate is not trained and holds no values: the product-key bank still stores every
answer; the codebook only decides *whether* to read it. It costs ``facts x width`` floats
and, with ``index="exact"`` (the default), one matrix product per position against every
key: fine up to ~10^5 stored questions on a CPU. ``index="faiss-hnsw"`` searches a FAISS
HNSW graph over the same keys instead (faiss-cpu, the optional extra ``factlab[faiss]``;
Lamini's public reference code also keeps one FAISS entry per fact): sub-linear in the
keys, approximate (a query can miss its nearest key, i.e. the gate stays shut where the
exact codebook would open: ``bench/memory_lookup.py --gate`` measures how often).
``index="faiss-flat"`` is FAISS's exhaustive inner product, equal to the exact codebook.
The keys (a buffer, saved with the model) stay the truth; the FAISS index is built from
them when first searched, takes each later write's keys as they are added, and is never
saved. The nearest-key cosine is
also the bank's confidence that it holds a question (``MemoryModel.question_scores``), the
score abstention is read from.

Which radius: chosen on validation prompts the bank must leave alone (never-stored names,
other attributes of stored names, the backbone's own questions) by :func:`pick_radius`,
never on the prompts that are reported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from factlab.errors import FactlabError


INDEXES = ("exact", "faiss-flat", "faiss-hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise FactlabError("key gate index faiss-flat / faiss-hnsw needs faiss-cpu "
                           "(pip install 'factlab[faiss]'), or index=exact") from e
    return faiss


def _np32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class KeyGate(nn.Module):
    def __init__(self, dim: int, radius: float = 0.98, index: str = "exact",
                 hnsw_m: int = 32, ef_search: int = 64):
        super().__init__()
        if not -1.0 < radius <= 1.0:
            raise FactlabError(f"key gate: radius must be in (-1, 1], got {radius}")
        if index not in INDEXES:
            raise FactlabError(f"key gate index={index!r}: choose {', '.join(INDEXES)}")
        if index != "exact":
            _faiss()  # a missing package fails here, not at the first search
        self.radius = float(radius)
        self.search, self.hnsw_m, self.ef_search = index, int(hnsw_m), int(ef_search)
        self._faiss_index = None  # built from ``keys`` when first searched
        self.register_buffer("keys", torch.zeros(0, dim))
        # statistics of the questions first stored: the bank's query reads the question's
        # state centred and whitened by them (questions of one template share most of
        # their state; a random query projection of the raw states would send different
        # facts to the same slots)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whiten", torch.zeros(dim, dim))

    @property
    def fitted(self) -> bool:
        return bool(self.whiten.abs().sum() > 0)

    def fit(self, states: torch.Tensor, shrink: float = 0.1) -> None:
        """Centre and whiten (PCA, eigenvalues shrunk towards their mean by ``shrink``)
        by these states' statistics; the whitened states have unit mean square norm per
        dimension."""
        x = states.detach().float()
        mu = x.mean(0)
        cov = torch.cov((x - mu).T) if len(x) > 1 else torch.eye(x.shape[1])
        ev, vec = torch.linalg.eigh(cov)
        ev = (1 - shrink) * ev.clamp_min(0) + shrink * ev.clamp_min(0).mean() + 1e-8
        self.mean = mu.to(self.mean.device)
        self.whiten = (vec / ev.sqrt()).to(self.whiten.device)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def add(self, states: torch.Tensor) -> None:
        """Store the (n, dim) states as keys (L2-normalised, fp32)."""
        k = F.normalize(states.detach().float(), dim=-1).to(self.keys.device)
        self.keys = torch.cat([self.keys, k])
        if self._faiss_index is not None:  # a built index takes the new keys (HNSW
            self._faiss_index.add(_np32(k))  # inserts them), not a rebuild of all

    def clear(self) -> None:
        self.keys = self.keys[:0]
        self._faiss_index = None

    def _search_faiss(self, x: torch.Tensor):
        faiss = _faiss()
        if self._faiss_index is None or self._faiss_index.ntotal != len(self):  # first search,
            # or keys loaded / cleared since
            d = self.keys.shape[1]
            if self.search == "faiss-hnsw":
                ix = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                ix.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
            else:
                ix = faiss.IndexFlatIP(d)
            ix.add(_np32(self.keys))
            self._faiss_index = ix
        if self.search == "faiss-hnsw":
            self._faiss_index.hnsw.efSearch = self.ef_search
        v, i = self._faiss_index.search(_np32(x), 1)
        return (torch.from_numpy(v[:, 0]).to(x.device),
                torch.from_numpy(i[:, 0].astype(np.int64)).to(x.device))

    def match(self, h: torch.Tensor, chunk: int = 65536, index: bool = False):
        """The nearest stored key's cosine for every row of ``h`` (..., dim): (...,) fp32;
        -1 where nothing is stored. ``index``: also that key's index, (...,) int64 (-1
        where nothing is stored)."""
        lead = h.shape[:-1]
        x = F.normalize(h.reshape(-1, h.shape[-1]).float(), dim=-1)
        best = torch.full((x.shape[0],), -1.0, device=h.device)
        arg = torch.full((x.shape[0],), -1, dtype=torch.long, device=h.device)
        if self.search != "exact" and len(self) and len(x):
            v, i = self._search_faiss(x)
            found = i >= 0  # HNSW returns -1 where it found nothing
            best = torch.where(found, v, best)
            arg = torch.where(found, i, arg)
            return (best.view(lead), arg.view(lead)) if index else best.view(lead)
        for s in range(0, len(self), chunk):
            v, i = (x @ self.keys[s:s + chunk].T).max(-1)
            better = v > best
            best = torch.where(better, v, best)
            arg = torch.where(better, i + s, arg)
        return (best.view(lead), arg.view(lead)) if index else best.view(lead)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        k = state_dict.get(prefix + "keys")
        if k is not None:  # the codebook's size is the saved one
            self.keys = torch.empty_like(k, device=self.keys.device)
            self._faiss_index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)


def pick_radius(negative_scores, margin: float = 0.5) -> float:
    """A radius between the highest nearest-key cosine of validation questions the bank
    must not answer and 1 (a stored question's own score): ``max + margin * (1 - max)``."""
    s = np.asarray(negative_scores, dtype=np.float64)
    if not len(s):
        raise FactlabError("pick_radius: no validation scores")
    top = float(s.max())
    if top >= 1 - 1e-4:
        raise FactlabError(f"pick_radius: a validation question scores {top:.6f}, i.e. it is "
                           f"a stored question; validation prompts must be ones the bank "
                           f"must not answer")
    return float(min(1.0, top + margin * (1.0 - top)))
