"""Token data: encoded documents and QA, and the streams a training run reads.

Everything here is numpy (no torch). Encodings are flat: one int32 token array plus
offsets, so 500k documents are a few arrays, not 500k Python lists.

Streams are *randomly addressable*: ``stream.sequences(start, n)`` returns sequences
``start .. start+n-1`` of an infinite, deterministic sequence, computed from the seed and
the index alone. A run that resumes at step s asks for sequence ``s * batch`` and gets
exactly what an uninterrupted run would have seen; nothing is iterated or replayed.
Every stream returns ``dict(input_ids=(n, seq_len) int64, labels=(n, seq_len) int64)``
with ``labels = -100`` where no loss is taken; the model shifts labels internally (HF
causal-LM convention), so ``labels[t]`` is predicted from positions ``< t``.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError

IGNORE = -100  # label of positions that take no loss
CHUNK = 16384  # texts per tokenizer call (bounds memory; results do not depend on it)


# --------------------------------------------------------------------------- encoding

def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None)


def _flatten(lists):
    """Ragged Python lists of ints -> (flat int32, lengths int64)."""
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32,
                       count=int(lens.sum()))
    return flat, lens


def _encode_ids(tokenizer, texts: list[str]):
    """Token ids of ``texts`` (no specials added) as (flat int32, lengths int64)."""
    bt = _backend(tokenizer)
    if bt is not None:  # the Rust tokenizer directly: no per-text BatchEncoding overhead
        fast = getattr(bt, "encode_batch_fast", bt.encode_batch)
        return _flatten([e.ids for e in fast(texts, add_special_tokens=False)])
    return _flatten(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _byte_lengths(tokenizer):
    """Bytes of text each token id stands for, when the tokenizer is a plain byte-level BPE
    (every token string is one character per byte); None otherwise. Lets document
    encoding skip offset mappings (their per-token tuples cost ~20% of the encode time);
    :func:`_encode_chunk_bytes` checks that the lengths add up to each text's bytes and
    falls back to offsets when they do not."""
    import json

    bt = _backend(tokenizer)
    if bt is None or bt.normalizer is not None:
        return None
    pre = json.loads(bt.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return None
    vocab = bt.get_vocab(with_added_tokens=True)
    n = max(vocab.values(), default=-1) + 1
    table = np.zeros(n, dtype=np.int64)
    for tok, i in vocab.items():
        table[i] = len(tok)
    for i, added in bt.get_added_tokens_decoder().items():  # matched in raw text
        if i < n:
            table[i] = len(added.content.encode("utf-8"))
    return table


@dataclass
class EncodedDocs:
    """Documents as tokens. Doc ``d`` is ``ids[offsets[d]:offsets[d+1]]`` (no EOS);
    ``value_tok[d, a]`` is the index within doc ``d`` of the token holding the first
    character of attribute ``a``'s value (-1: the doc does not state it)."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (D+1,) int64
    value_tok: np.ndarray  # (D, A) int32
    person: np.ndarray  # (D,) int32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, d: int) -> np.ndarray:
        return self.ids[self.offsets[d]:self.offsets[d + 1]]


def doc_prefix(tokenizer) -> str:
    """What :func:`encode_docs` puts before every document: ``" "`` for tokenizers (byte-level
    BPE: ours, GPT-2's) where a word at the start of a text is a different token from the
    same word after a space, ``""`` for those that add a prefix space themselves.

    Why: a bio starts with the person's name and a question has it after a space. Without
    the space the first name of ``"Caleb Sidney Aguilar was born"`` is ``C|al|eb`` and in
    ``"... of Caleb Sidney Aguilar?"`` it is ``Cal|eb`` (with its space): the model stores
    what it learns on one set of tokens and the question asks with another. On the CPU
    quickstart model this alone held OOD extraction near 20% with the bios memorised.
    """
    def ids(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    bare, spaced, inner = ids("Name"), ids(" Name"), ids("x Name")
    return " " if bare != spaced and inner[-len(spaced):] == spaced else ""


def encode_docs(tokenizer, docs) -> EncodedDocs:
    """Tokenize every document of ``docs`` (a :class:`~factlab.text.documents.Docs`) and
    locate the first token of every attribute value from its character span. Each text is
    encoded with :func:`doc_prefix` before it, so a name opening a document is the same
    tokens as the name inside a question."""
    texts = docs.text
    D = len(texts)
    spans = np.asarray(docs.spans)
    A = spans.shape[1] if spans.ndim == 3 else 0
    table = _byte_lengths(tokenizer)
    pre = doc_prefix(tokenizer)
    id_parts, len_parts, vt_parts = [], [], []
    for lo in range(0, D, CHUNK):
        hi = min(lo + CHUNK, D)
        batch = [pre + t for t in texts[lo:hi]]
        starts = spans[lo:hi, :, 0].astype(np.int64) if A else np.zeros((hi - lo, 0), np.int64)
        starts = np.where(starts >= 0, starts + len(pre), starts)
        got = _encode_chunk_bytes(tokenizer, batch, starts, table) if table is not None else None
        if got is None:  # not byte-level (or bytes did not add up): use offset mappings
            got = _encode_chunk_offsets(tokenizer, batch, starts)
        id_parts.append(got[0])
        len_parts.append(got[1])
        vt_parts.append(got[2])
    if not id_parts:
        return EncodedDocs(np.zeros(0, np.int32), np.zeros(1, np.int64),
                           np.zeros((0, A), np.int32), np.asarray(docs.person, np.int32))
    lens = np.concatenate(len_parts)
    return EncodedDocs(np.concatenate(id_parts), np.concatenate([[0], np.cumsum(lens)]),
                       np.concatenate(vt_parts).astype(np.int32),
                       np.asarray(docs.person, dtype=np.int32))


def _first_token(ends, tok_off, base, starts):
    """Index within each doc of the first token whose end lies past ``base + start``.

    ``ends``: global (chunk-wide) end position of every token, non-decreasing;
    ``tok_off``: (n+1,) first token of each doc; ``base``: (n,) global position of each
    doc's first character/byte; ``starts``: (n, A) value starts within the doc, -1 absent.
    """
    n, A = starts.shape
    pos = base[:, None] + np.maximum(starts, 0)
    k = np.searchsorted(ends, pos.reshape(-1), side="right").reshape(n, A)
    local = k - tok_off[:-1, None]
    return np.where(starts >= 0, local, -1)


def _encode_chunk_bytes(tokenizer, batch, starts, table):
    flat, lens = _encode_ids(tokenizer, batch)
    nbytes = table[flat]
    cum = np.cumsum(nbytes)
    cum0 = np.concatenate([[0], cum])
    tok_off = np.concatenate([[0], np.cumsum(lens)])
    ascii_ = np.fromiter((t.isascii() for t in batch), dtype=bool, count=len(batch))
    want = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
    starts = starts.copy()
    for i in np.flatnonzero(~ascii_).tolist():  # rare: character -> byte positions
        t = batch[i]
        want[i] = len(t.encode("utf-8"))
        for a in np.flatnonzero(starts[i] >= 0).tolist():
            starts[i, a] = len(t[:starts[i, a]].encode("utf-8"))
    if not np.array_equal(cum0[tok_off[1:]] - cum0[tok_off[:-1]], want):
        return None
    return flat, lens, _first_token(cum, tok_off, cum0[tok_off[:-1]], starts)


def _encode_chunk_offsets(tokenizer, batch, starts):
    bt = _backend(tokenizer)
    if bt is not None:
        encs = bt.encode_batch(batch, add_special_tokens=False)
        ids = [e.ids for e in encs]
        offs = [e.offsets for e in encs]
    else:
        out = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = out["input_ids"], out["offset_mapping"]
    flat, lens = _flatten(ids)
    ends = np.fromiter((e for o in offs for _, e in o), dtype=np.int64, count=len(flat))
    tok_off = np.concatenate([[0], np.cumsum(lens)])
    char_len = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
    base = np.concatenate([[0], np.cumsum(char_len)])[:-1]
    ends = np.maximum.accumulate(ends + np.repeat(base, lens)) if len(ends) else ends
    return flat, lens, _first_token(ends, tok_off, base, starts)


@dataclass
class EncodedQA:
    """QA examples as tokens: example ``q`` is ``ids[offsets[q]:offsets[q+1]]`` =
    prompt tokens, completion tokens, EOS; the completion starts at ``answer_start[q]``."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (Q+1,) int64
    answer_start: np.ndarray  # (Q,) int32
    person: np.ndarray  # (Q,) int32
    attribute: np.ndarray  # (Q,) int16

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, q: int) -> np.ndarray:
        return self.ids[self.offsets[q]:self.offsets[q + 1]]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise FactlabError("tokenizer has no eos token")
    return int(eos)


def encode_qa(tokenizer, qa) -> EncodedQA:
    """Tokenize ``prompt(question)`` and ``completion(answer)`` separately (so the boundary
    is exact), concatenate them and append EOS. Answers repeat across people, so each
    distinct answer is tokenized once."""
    from factlab.text.qa import completion, prompt

    eos = _eos_id(tokenizer)
    Q = len(qa)
    p_parts = [_encode_ids(tokenizer, [prompt(q) for q in qa.question[lo:lo + CHUNK]])
               for lo in range(0, Q, CHUNK)]
    P = np.concatenate([p[0] for p in p_parts]) if p_parts else np.zeros(0, np.int32)
    Lp = np.concatenate([p[1] for p in p_parts]) if p_parts else np.zeros(0, np.int64)
    uniq: dict[str, int] = {}
    inv = np.fromiter((uniq.setdefault(a, len(uniq)) for a in qa.answer), dtype=np.int64,
                      count=Q)
    C_u, Lc_u = _encode_ids(tokenizer, [completion(a) for a in uniq]) if uniq else \
        (np.zeros(0, np.int32), np.zeros(0, np.int64))
    c_off_u = np.concatenate([[0], np.cumsum(Lc_u)])
    Lc = Lc_u[inv]
    L = Lp + Lc + 1
    offsets = np.concatenate([[0], np.cumsum(L)]).astype(np.int64)
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    # prompt tokens: k-th prompt token of example q goes to offsets[q] + k
    p_off = np.concatenate([[0], np.cumsum(Lp)])
    out[np.repeat(offsets[:-1] - p_off[:-1], Lp) + np.arange(len(P))] = P
    # completion tokens: gathered from the distinct-answer table
    c_cum = np.concatenate([[0], np.cumsum(Lc)])
    k = np.arange(int(c_cum[-1]))
    out[np.repeat(offsets[:-1] + Lp - c_cum[:-1], Lc) + k] = \
        C_u[np.repeat(c_off_u[inv] - c_cum[:-1], Lc) + k]
    out[offsets[1:] - 1] = eos
    return EncodedQA(out, offsets, Lp.astype(np.int32), np.asarray(qa.person, np.int32),
                     np.asarray(qa.attribute, np.int16))


# --------------------------------------------------------------------------- streams

def _rng(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(key)])


class _LRU(OrderedDict):
    """A tiny cache of per-epoch / per-block arrays (sequential reads hit the last one;
    a read across an epoch boundary needs two)."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = self[key] = make(key)
        if len(self) > self.size:
            self.popitem(last=False)
        return val


def _check_range(start: int, n: int) -> None:
    if start < 0 or n < 0:
        raise FactlabError(f"sequences(start={start}, n={n}): both must be >= 0")


class DocStream:
    """Documents packed into fixed-length sequences, globally shuffled per epoch.

    Epoch ``e``: every document once, in the order ``default_rng([seed, e]).permutation``,
    each followed by EOS, concatenated and cut into consecutive ``seq_len`` chunks; the
    tail that does not fill a chunk is dropped. Labels are the input ids (EOS included).
    Documents are shuffled over all entries, not kept together per person: packing one
    person's paraphrases into one sequence destroys generalisation (paper §3).

    ``whole=True`` never splits a document: documents (each with its EOS) go greedily
    into sequences in the same epoch order, the rest of a sequence is ``pad_id`` with
    label -100 (a document longer than ``seq_len`` is an error). At a short context this
    matters: with ``seq_len`` 128 and ~77-token bios, concatenation splits about 60% of
    bios, and the half without the name teaches the model to guess attributes without
    looking at the person. With ``seq_len`` below two documents' length every sequence
    holds exactly one document, so no other person's name is in context either: whole
    packing memorises fast but keys each person to the start of a sequence, which is why
    the quickstart ends its pretraining with ``mask_head`` packing (docs/extraction.md §3-4).

    ``mask_head=True`` (concatenation otherwise unchanged) takes the leading fragment of a
    sequence -- the end of a document whose start, and so its name, fell into the previous
    sequence -- out of the loss (labels -100 up to and including its EOS). The fragment
    stays in context, so names appear at every position, after another person's text, as
    they do in a question; but no target is predicted without its person in view.
    """

    def __init__(self, enc: EncodedDocs, seq_len: int, eos_id: int, seed: int = 0,
                 whole: bool = False, pad_id: int | None = None, mask_head: bool = False):
        if seq_len < 1:
            raise FactlabError(f"seq_len must be >= 1, got {seq_len}")
        if whole and mask_head:
            raise FactlabError("mask_head applies to concatenation, not whole-document packing")
        self.enc, self.seq_len, self.eos_id, self.seed = enc, int(seq_len), int(eos_id), seed
        self.whole, self.mask_head = bool(whole), bool(mask_head)
        self.lens = enc.lengths
        self.tokens_per_epoch = int(self.lens.sum()) + len(self.lens)
        self._packer = None
        if self.whole:  # greedy packing of docs-with-EOS: QAStream with an empty prompt
            ids = np.insert(enc.ids, enc.offsets[1:], np.int32(eos_id)).astype(np.int32)
            n = len(self.lens)
            offs = enc.offsets + np.arange(n + 1)
            too_long = np.flatnonzero(self.lens + 1 > self.seq_len)
            if len(too_long):
                d = int(too_long[0])
                raise FactlabError(f"document {d} is {int(self.lens[d]) + 1} tokens with EOS, "
                                   f"longer than seq_len={self.seq_len} with whole-document "
                                   f"packing ({len(too_long)} such documents)")
            self._packer = QAStream(
                EncodedQA(ids, offs, np.zeros(n, np.int32), enc.person, np.zeros(n, np.int16)),
                self.seq_len, eos_id if pad_id is None else pad_id, seed=seed)
            self.sequences_per_epoch = self._packer.sequences_per_epoch
            return
        self.sequences_per_epoch = self.tokens_per_epoch // self.seq_len
        if self.sequences_per_epoch == 0:
            raise FactlabError(f"{len(self.lens)} documents ({self.tokens_per_epoch} tokens "
                               f"with EOS) do not fill one sequence of {seq_len} tokens")
        self._cache = _LRU()

    def order(self, epoch: int) -> np.ndarray:
        """The documents of ``epoch`` in stream order."""
        return _rng(self.seed, epoch).permutation(len(self.lens))

    def _epoch(self, epoch: int):
        perm = self.order(epoch)
        span = self.lens[perm] + 1  # the doc and its EOS
        return np.cumsum(span), span, self.enc.offsets[:-1][perm]

    def _tokens(self, epoch: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of epoch ``epoch``'s concatenated stream."""
        ends, span, src = self._cache.get_or(epoch, self._epoch)
        pos = np.arange(a, b, dtype=np.int64)
        k = np.searchsorted(ends, pos, side="right")
        within = pos - (ends[k] - span[k])
        eos = within == span[k] - 1
        ids = self.enc.ids
        tok = ids[np.minimum(src[k] + within, len(ids) - 1)] if len(ids) else \
            np.zeros(len(pos), np.int32)
        return np.where(eos, self.eos_id, tok).astype(np.int64)

    def sequences(self, start: int, n: int) -> dict:
        if self._packer is not None:
            return self._packer.sequences(start, n)
        _check_range(start, n)
        L, spe = self.seq_len, self.sequences_per_epoch
        out = np.empty((n, L), dtype=np.int64)
        at_doc = np.ones(n, dtype=bool)  # does the row start a document?
        k = start
        while k < start + n:  # one contiguous run per epoch touched
            e, j = divmod(k, spe)
            m = min(spe - j, start + n - k)
            out[k - start:k - start + m] = self._tokens(e, j * L, (j + m) * L).reshape(m, L)
            if self.mask_head:
                row_starts = np.arange(j, j + m, dtype=np.int64) * L
                ends = self._cache.get_or(e, self._epoch)[0]
                at_doc[k - start:k - start + m] = (row_starts == 0) | np.isin(row_starts, ends)
            k += m
        labels = out.copy()
        if self.mask_head and not at_doc.all():
            is_eos = out == self.eos_id
            # first EOS of the row (a row without one is all fragment: mask it whole)
            first = np.where(is_eos.any(1), is_eos.argmax(1), L - 1)
            head = (np.arange(L)[None, :] <= first[:, None]) & ~at_doc[:, None]
            labels[head] = -100
        return {"input_ids": out, "labels": labels}


class QAStream:
    """QA examples packed whole into fixed-length sequences, loss on answers only.

    Epoch ``e``: every example once, in the order ``default_rng([seed, e]).permutation``,
    packed greedily: an example goes into the current sequence if it fits, else it starts
    the next one (examples are never split); the rest of a sequence is ``pad_id``.
    Labels are the token ids on completion tokens and the final EOS, -100 on prompts and
    padding. The number of sequences per epoch depends on the order (it varies by a few
    between epochs); ``sequences_per_epoch`` is epoch 0's, :meth:`epoch_size` any epoch's.

    ``pack=False`` puts one example in each sequence (the loop trims the padding). This is
    what QA finetuning wants: in a packed row every question after the first is asked with
    other people's questions and answers in view, and on the CPU quickstart's
    multi5+permute model OOD exact match after a full finetune was 26% packed vs 44% one
    per sequence (same steps, lr 3e-4), with one eighth of the compute.
    """

    def __init__(self, enc: EncodedQA, seq_len: int, pad_id: int, seed: int = 0,
                 pack: bool = True):
        self.enc, self.seq_len, self.pad_id, self.seed = enc, int(seq_len), int(pad_id), seed
        self.pack = bool(pack)
        self.lens = enc.lengths
        if len(self.lens) == 0:
            raise FactlabError("QAStream: no QA examples")
        too_long = np.flatnonzero(self.lens > self.seq_len)
        if len(too_long):
            q = int(too_long[0])
            raise FactlabError(f"QA example {q} is {int(self.lens[q])} tokens, longer than "
                               f"seq_len={self.seq_len} ({len(too_long)} such examples)")
        self._cache = _LRU()
        self._cum = [0]  # sequences before epoch e (extended lazily)

    def order(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, epoch).permutation(len(self.lens))

    def _epoch(self, epoch: int):
        perm = self.order(epoch)
        cum = np.concatenate([[0], np.cumsum(self.lens[perm])])
        if not self.pack:
            return perm, cum, np.arange(len(perm) + 1, dtype=np.int64)
        cl, L, Q = cum.tolist(), self.seq_len, len(perm)
        first = []  # first example (in epoch order) of every sequence
        i = 0
        while i < Q:  # greedy next-fit; one bisect per sequence, not per example
            first.append(i)
            i = bisect_right(cl, cl[i] + L, i + 1) - 1
        return perm, cum, np.array(first + [Q], dtype=np.int64)

    def epoch_size(self, epoch: int) -> int:
        return len(self._cache.get_or(epoch, self._epoch)[2]) - 1

    @property
    def sequences_per_epoch(self) -> int:
        return self.epoch_size(0)

    def _locate(self, k: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of sequence ``k``."""
        while self._cum[-1] <= k:
            self._cum.append(self._cum[-1] + self.epoch_size(len(self._cum) - 1))
        e = bisect_right(self._cum, k) - 1
        return e, k - self._cum[e]

    def _pack(self, epoch: int, j0: int, m: int, ids_out, lab_out) -> None:
        perm, cum, first = self._cache.get_or(epoch, self._epoch)
        lo, hi = int(first[j0]), int(first[j0 + m])
        ex = perm[lo:hi]  # examples of these sequences, in order
        seq = np.repeat(np.arange(m), np.diff(first[j0:j0 + m + 1]))
        col0 = cum[lo:hi] - cum[first[j0:j0 + m]][seq]  # start column of each example
        lens = self.lens[ex]
        t_cum = np.concatenate([[0], np.cumsum(lens)])
        within = np.arange(int(t_cum[-1])) - np.repeat(t_cum[:-1], lens)
        dest = np.repeat(seq * self.seq_len + col0, lens) + within
        tok = self.enc.ids[np.repeat(self.enc.offsets[ex], lens) + within].astype(np.int64)
        ans = within >= np.repeat(self.enc.answer_start[ex], lens)
        ids_out.reshape(-1)[dest] = tok
        lab_out.reshape(-1)[dest] = np.where(ans, tok, IGNORE)

    def sequences(self, start: int, n: int) -> dict:
        _check_range(start, n)
        ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        lab = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        k = start
        while k < start + n:
            e, j = self._locate(k)
            m = min(self.epoch_size(e) - j, start + n - k)
            self._pack(e, j, m, ids[k - start:k - start + m], lab[k - start:k - start + m])
            k += m
        return {"input_ids": ids, "labels": lab}


class Mixture:
    """Sequences drawn from several streams: sequence ``k`` comes wholly from stream ``i``
    with probability ``probs[i]`` (paper §3 mixed training: all-QA with p=0.8, else
    all-bio). The j-th time stream ``i`` is picked it contributes its j-th sequence, so
    each source keeps its own order and epochs.

    Choices are drawn in blocks of :attr:`BLOCK` with ``default_rng([seed, block])``;
    per-block counts are cumulated lazily and kept, so ``sequences(k, n)`` for k in the
    millions costs one pass over the blocks before k the first time, then O(n).
    """

    BLOCK = 4096

    def __init__(self, streams: list, probs: list[float], seed: int = 0):
        if not streams or len(streams) != len(probs):
            raise FactlabError(f"Mixture: {len(streams)} streams but {len(probs)} probs")
        lens = {int(s.seq_len) for s in streams}
        if len(lens) != 1:
            raise FactlabError(f"Mixture: streams have different seq_len {sorted(lens)}")
        p = np.asarray(probs, dtype=np.float64)
        if (p < 0).any() or not np.isfinite(p).all() or abs(p.sum() - 1) > 1e-6:
            raise FactlabError(f"Mixture: probs must be >= 0 and sum to 1, got {list(probs)}")
        self.streams, self.probs, self.seed = list(streams), p, seed
        self.seq_len = lens.pop()
        self._cdf = np.cumsum(p)
        self._cdf[-1] = 1.0
        self._before = [np.zeros(len(streams), dtype=np.int64)]  # picks before block b
        self._blocks = _LRU(8)

    @property
    def sequences_per_epoch(self) -> int:
        """Mixture sequences that take every source through one epoch, in expectation."""
        return int(max(np.ceil(s.sequences_per_epoch / q)
                       for s, q in zip(self.streams, self.probs) if q > 0))

    def _block(self, b: int):
        u = _rng(self.seed, b).random(self.BLOCK)
        c = np.searchsorted(self._cdf, u, side="right").clip(0, len(self.streams) - 1)
        onehot = c[:, None] == np.arange(len(self.streams))[None, :]
        rank = np.cumsum(onehot, axis=0)[np.arange(self.BLOCK), c] - 1
        return c, rank, onehot.sum(axis=0)

    def sources(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For sequences ``start..start+n-1``: the stream each comes from and its index
        in that stream."""
        _check_range(start, n)
        k = np.arange(start, start + n, dtype=np.int64)
        blocks = k // self.BLOCK
        src = np.empty(n, dtype=np.int64)
        idx = np.empty(n, dtype=np.int64)
        for b in np.unique(blocks).tolist():
            while len(self._before) <= b:  # cumulate counts up to block b
                nb = len(self._before) - 1
                self._before.append(self._before[nb] + self._blocks.get_or(nb, self._block)[2])
            c, rank, _ = self._blocks.get_or(b, self._block)
            m = blocks == b
            pos = k[m] - b * self.BLOCK
            src[m] = c[pos]
            idx[m] = self._before[b][c[pos]] + rank[pos]
        return src, idx

    def sequences(self, start: int, n: int) -> dict:
        src, idx = self.sources(start, n)
        ids = np.empty((n, self.seq_len), dtype=np.int64)
        lab = np.empty((n, self.seq_len), dtype=np.int64)
        for s in np.unique(src).tolist():
            rows = np.flatnonzero(src == s)
            j = idx[rows]  # consecutive by construction
            got = self.streams[s].sequences(int(j[0]), len(j))
            ids[rows] = got["input_ids"]
            lab[rows] = got["labels"]
        return {"input_ids": ids, "labels": lab}


class Schedule:
    """Streams one after another: the first ``lengths[0]`` sequences come from
    ``streams[0]`` (its sequences 0, 1, ...), the next ``lengths[1]`` from ``streams[1]``
    (again from its sequence 0), and so on; the last stream runs on without end.

    A curriculum over packings: the CPU quickstart memorises bios packed whole (fast, but
    each person sits at position 0 of its sequence) and then packs them ``named`` so that
    a name found after other text is looked up too. Addressed by sequence index like every
    stream here, so a resumed run sees the same data.
    """

    def __init__(self, streams: list, lengths: list[int]):
        if not streams or len(lengths) != len(streams) - 1:
            raise FactlabError(f"Schedule: {len(streams)} streams need {len(streams) - 1} "
                               f"segment lengths, got {len(lengths)}")
        if any(int(n) < 1 for n in lengths):
            raise FactlabError(f"Schedule: segment lengths must be >= 1, got {list(lengths)}")
        lens = {int(s.seq_len) for s in streams}
        if len(lens) != 1:
            raise FactlabError(f"Schedule: streams have different seq_len {sorted(lens)}")
        self.streams, self.seq_len = list(streams), lens.pop()
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])

    @property
    def sequences_per_epoch(self) -> int:
        return self.streams[-1].sequences_per_epoch

    def sequences(self, start: int, n: int) -> dict:
        _check_range(start, n)
        parts, k = [], start
        while k < start + n:
            i = int(np.searchsorted(self.starts, k, side="right")) - 1
            end = int(self.starts[i + 1]) if i + 1 < len(self.starts) else start + n
            m = min(end, start + n) - k
            parts.append(self.streams[i].sequences(k - int(self.starts[i]), m))
            k += m
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# --------------------------------------------------------------------------- first token

@dataclass
class FirstTokenTargets:
    """Inputs and targets for first-token accuracy.

    ``input_ids[r, :lengths[r]]`` is token window ``r`` (right-padded with ``pad_id``).
    Target ``i`` asks: do the logits at ``input_ids[row[i], position[i]]`` predict token
    ``target[i]``? (the first token of attribute ``attribute[i]``'s value for
    ``person[i]``, from document / QA example ``source[i]``). Causal models only look
    left, so padding after a position never changes its prediction.
    """

    input_ids: np.ndarray  # (R, W) int64
    lengths: np.ndarray  # (R,) int64
    row: np.ndarray  # (M,) int64, row of input_ids
    position: np.ndarray  # (M,) int64, < lengths[row]
    target: np.ndarray  # (M,) int64 token id
    person: np.ndarray  # (M,) int32
    attribute: np.ndarray  # (M,) int16
    source: np.ndarray  # (M,) int64, document (or QA example) index

    def __len__(self) -> int:
        return len(self.target)


def _windows(ids, offsets, rows, max_len, pad_id):
    starts = offsets[rows]
    lens = np.minimum(offsets[rows + 1] - starts, max_len)
    W = int(lens.max()) if len(lens) else 0
    out = np.full((len(rows), W), pad_id, dtype=np.int64)
    col = np.arange(W)[None, :]
    inside = col < lens[:, None]
    out[inside] = ids[(starts[:, None] + col)[inside]]
    return out, lens


def first_token_targets(enc: EncodedDocs, seq_len: int, docs=None,
                        pad_id: int = 0) -> FirstTokenTargets:
    """First-token targets inside bios.

    One row per document of ``docs`` (default: all; pass a subset for large worlds —
    the padded array is rows x longest window): the document's tokens alone, truncated to
    ``seq_len``. One target per (document, attribute) with ``value_tok >= 1`` and
    position ``p = value_tok - 1 < seq_len``: the logits at ``p`` should predict the
    value's first token ``ids[offsets[d] + value_tok]`` (the token that holds the value's
    first character; with byte-level BPE it usually includes the preceding space).
    Returns a :class:`FirstTokenTargets`; ``source`` is the document index.
    """
    rows = np.arange(len(enc)) if docs is None else np.asarray(docs, dtype=np.int64)
    win, lens = _windows(enc.ids, enc.offsets, rows, seq_len, pad_id)
    vt = enc.value_tok[rows].astype(np.int64)  # (R, A)
    ok = (vt >= 1) & (vt - 1 < seq_len)
    r, a = np.nonzero(ok)
    d = rows[r]
    return FirstTokenTargets(win, lens, r.astype(np.int64), vt[r, a] - 1,
                             enc.ids[enc.offsets[d] + vt[r, a]].astype(np.int64),
                             enc.person[d], a.astype(np.int16), d)


def qa_first_token_targets(enc: EncodedQA, examples=None, pad_id: int = 0) -> FirstTokenTargets:
    """First-token targets of QA answers: one row per example of ``examples`` (default:
    all) holding the whole example (prompt, completion, EOS); one target per example at
    ``position = answer_start - 1`` with ``target`` = the first completion token.
    Returns a :class:`FirstTokenTargets` with ``row = arange(R)``; ``source`` is the
    example index."""
    rows = np.arange(len(enc)) if examples is None else np.asarray(examples, dtype=np.int64)
    lens_all = enc.offsets[rows + 1] - enc.offsets[rows]
    win, lens = _windows(enc.ids, enc.offsets, rows, int(lens_all.max()) if len(rows) else 0,
                         pad_id)
    a0 = enc.answer_start[rows].astype(np.int64)
    return FirstTokenTargets(win, lens, np.arange(len(rows), dtype=np.int64), a0 - 1,
                             enc.ids[enc.offsets[rows] + a0].astype(np.int64),
                             enc.person[rows], enc.attribute[rows], rows)
