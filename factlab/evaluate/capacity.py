"""Bits of knowledge a model stores (Physics of Language Models, Part 3.3), as a pure
function of the model's losses on the values it was trained on.

Part 3.3 bounds what a model trained on bioS(N) holds: for attribute k, whose value each
person draws uniformly from D_k possibilities, a model whose summed loss on the value's
tokens is p_k nats (per person, teacher-forced after the text before the value) holds
at least ``N · log2(D_k / e^{p_k}) = N · (log2 D_k − p_k / ln 2)`` bits of it: the value's
entropy minus what the model still does not know (its cross-entropy, in bits). A model
certain of every value stores exactly the world's entropy Σ_k N log2 D_k; one at chance
(uniform over the D_k values, p_k = ln D_k) stores zero; one worse than chance is
counted as zero, not negative. (The paper's name term — the entropy of the names — and
its diversity term for values drawn from a learned vocabulary are left out: bioS names
and values come from fixed pools here.) An attribute that is a function of another
(bioS's company city follows the employer) has D = 1 given it: zero bits.

A value is scored in a text that does not already give it away: an attribute that follows
it (the company city, for the employer) stated before it tells the model most of the
value (measured 2026-12-07: with the company city first, a width-64 model put 1.29 nats on
an 8,000-person world's employers; with the employer first 5.67, chance 5.57 -- so the
employer's bits it had been credited were all read off the city). :func:`clean_docs`
picks, for each person and attribute, their first document where no follower comes
first; a person with no such document counts as storing nothing of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError


def bits_stored(value_nll: Mapping[str, np.ndarray], pool_sizes: Mapping[str, int]) -> dict:
    """Bits stored per attribute and in total.

    ``value_nll[a]``: (N,) the model's summed NLL in nats of each person's value of ``a``;
    ``pool_sizes[a]``: D_a, the number of values ``a`` is drawn uniformly from (1 for a
    derived attribute). Returns ``{"attributes": {a: {"bits", "entropy_bits", "people",
    "mean_nll_nats"}}, "bits": total, "entropy_bits": total, "fraction": bits / entropy}``.
    """
    out: dict = {"attributes": {}}
    total = entropy = 0.0
    for a, nll in value_nll.items():
        if a not in pool_sizes:
            raise FactlabError(f"capacity: no pool size for attribute {a!r}")
        d = int(pool_sizes[a])
        if d < 1:
            raise FactlabError(f"capacity: attribute {a!r} has pool size {d}; need >= 1")
        x = np.asarray(nll, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all() or (x < 0).any():
            raise FactlabError(f"capacity: the losses of {a!r} must be finite and >= 0 "
                               f"(summed NLL in nats)")
        n = len(x)
        h = n * math.log2(d)
        bits = max(0.0, h - float(x.sum()) / math.log(2))
        out["attributes"][a] = {"bits": bits, "entropy_bits": h, "people": n,
                                "mean_nll_nats": float(x.mean()) if n else None}
        total += bits
        entropy += h
    out.update(bits=total, entropy_bits=entropy,
               fraction=total / entropy if entropy > 0 else None)
    return out


def bits_per_parameter(bits: float, parameters: int) -> float:
    """Part 3.3's unit: about 2 bits per parameter at 1,000 exposures, 1 at 100."""
    if parameters < 1:
        raise FactlabError(f"capacity: parameters must be >= 1, got {parameters}")
    return float(bits) / int(parameters)


def pool_sizes(world) -> dict[str, int]:
    """D_a for every attribute of a world (a World or Corpus): its pool's size, 1 for an
    attribute that follows another (``world.derived``: bioS's company city given the
    employer)."""
    table = world.people
    derived = {d.attribute for d in getattr(world, "derived", ())}
    return {a: 1 if i in derived else len(table.pools[i])
            for i, a in enumerate(table.attributes)}


@dataclass
class _ValueSpans:
    """Teacher-forced examples for :func:`~factlab.evaluate.score.score_encoded`: each is a
    document's tokens up to the end of one value; the value's tokens are the 'answer'."""

    ids: np.ndarray
    offsets: np.ndarray  # document offsets into ids
    doc: np.ndarray  # (M,) document of each example
    answer_start: np.ndarray  # (M,) first value token within the document
    lengths: np.ndarray  # (M,) one past the last value token

    def __len__(self) -> int:
        return len(self.doc)

    def example(self, q: int) -> np.ndarray:
        lo = int(self.offsets[self.doc[q]])
        return self.ids[lo:lo + int(self.lengths[q])]


def value_spans(tokenizer, docs) -> tuple[_ValueSpans, np.ndarray]:
    """Every stated value of ``docs`` as a token range of its document (encoded as for
    training, ``encode_docs``), and the attribute of each."""
    from dataclasses import replace

    from factlab.tokens.encode import encode_docs

    enc = encode_docs(tokenizer, docs)
    spans = np.asarray(docs.spans)
    last = spans.copy()
    last[..., 0] = np.where(spans[..., 0] >= 0, spans[..., 1] - 1, -1)
    end = encode_docs(tokenizer, replace(docs, spans=last)).value_tok.astype(np.int64) + 1
    start = enc.value_tok.astype(np.int64)
    d, a = np.nonzero(start >= 0)
    return _ValueSpans(enc.ids, enc.offsets, d, start[d, a], end[d, a]), a


def value_nll(model, tokenizer, docs, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The model's summed NLL (nats) of every value's tokens in ``docs``, teacher-forced on
    the document's text before it, per attribute in document order (documents that do
    not state an attribute are skipped). The value's tokens run from the one holding its
    first character (with byte-level BPE it includes the space before) to the one
    holding its last; a last token that also holds the next character (rare: values end
    before '.' or ',') is counted whole, which can only add loss."""
    from factlab.evaluate.score import score_encoded

    ex, a = value_spans(tokenizer, docs)
    nll = score_encoded(model, ex, batch_size=batch_size).nll
    return {attr: nll[a == k] for k, attr in enumerate(docs.attributes) if (a == k).any()}


def clean_docs(docs, derived=()) -> np.ndarray:
    """(A, N) for every attribute and person (people in sorted order of ``docs.person``),
    the index into ``docs`` of the person's first document (lowest ``entry``) that states
    the attribute with none of its followers (``derived``: ``Derived`` with ``attribute``
    following ``source``) stated before it; -1 where the person has none."""
    spans = np.asarray(docs.spans)
    person = np.asarray(docs.person)
    people, slot = np.unique(person, return_inverse=True)
    order = np.lexsort((np.asarray(docs.entry), person))  # by person, then entry
    out = np.full((spans.shape[1], len(people)), -1, dtype=np.int64)
    for a in range(spans.shape[1]):
        start = spans[:, a, 0]
        ok = start >= 0
        for d in derived:
            if d.source == a:
                f = spans[:, d.attribute, 0]
                ok &= (f < 0) | (f > start)
        idx = order[ok[order]]
        _, first = np.unique(slot[idx], return_index=True)  # each person's lowest entry
        out[a, slot[idx[first]]] = idx[first]
    return out


def person_value_nll(model, tokenizer, docs, pool_sizes: Mapping[str, int], derived=(),
                     *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Each person's summed NLL (nats) of each attribute's value (:func:`value_nll`),
    scored in their first document that does not give it away (:func:`clean_docs`); ln D
    (chance: no bits) for a person without one. Only the chosen documents are scored."""
    from factlab.text.documents import Docs

    pick = clean_docs(docs, derived)
    used = np.unique(pick[pick >= 0])
    spans = np.asarray(docs.spans)[used]
    sub = Docs([docs.text[i] for i in used.tolist()], np.asarray(docs.person)[used],
               np.asarray(docs.entry)[used], spans, docs.attributes)
    nll = value_nll(model, tokenizer, sub, batch_size=batch_size)
    out = {}
    for k, attr in enumerate(docs.attributes):
        if attr not in nll:
            continue
        # value_nll lists the documents that state the attribute, in order
        row = np.full(len(used), np.nan)
        row[spans[:, k, 0] >= 0] = nll[attr]
        got = row[np.searchsorted(used, np.maximum(pick[k], 0))]
        out[attr] = np.where(pick[k] >= 0, got, math.log(max(int(pool_sizes[attr]), 1)))
    return out
