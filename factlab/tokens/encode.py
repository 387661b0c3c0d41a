"""Encoding: documents and QA examples tokenized into ragged arrays.

:class:`EncodedDocs` (bios, with the token of every attribute value's first character)
and :class:`EncodedQA` (prompt + completion + EOS, with the exact answer boundary) are
:class:`~factlab.tokens.ragged.Ragged` arrays: one int32 token array plus offsets and
per-item columns, ``example_id`` among them, so subsets and unions (``take``, ``concat``)
keep every column and every item's id. Pure numpy apart from the tokenizer calls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError
from factlab.tokens.ragged import Ragged

CHUNK = 16384  # texts per tokenizer call (bounds memory; results do not depend on it)


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
class EncodedDocs(Ragged):
    """Documents as tokens. Doc ``d`` is ``ids[offsets[d]:offsets[d+1]]`` (no EOS);
    ``value_tok[d, a]`` is the index within doc ``d`` of the token holding the first
    character of attribute ``a``'s value (-1: the doc does not state it).
    ``example_id[d]`` (int64, default ``d``) names the document through ``take`` /
    ``concat`` and on the stream rows that hold it."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (D+1,) int64
    value_tok: np.ndarray  # (D, A) int32
    person: np.ndarray  # (D,) int32

    def doc(self, d: int) -> np.ndarray:
        return self.item(d)


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
class EncodedQA(Ragged):
    """QA examples as tokens: example ``q`` is ``ids[offsets[q]:offsets[q+1]]`` =
    prompt tokens, completion tokens, EOS; the completion starts at ``answer_start[q]``.
    ``example_id[q]`` (int64, default ``q``) names the example (the fact asked about)
    through ``take`` / ``concat`` and on the stream rows that hold it."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (Q+1,) int64
    answer_start: np.ndarray  # (Q,) int32
    person: np.ndarray  # (Q,) int32
    attribute: np.ndarray  # (Q,) int16

    def example(self, q: int) -> np.ndarray:
        return self.item(q)


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise FactlabError("tokenizer has no eos token")
    return int(eos)


def encode_qa(tokenizer, qa, prompt_format: str = "plain") -> EncodedQA:
    """Tokenize ``prompt(question)`` and ``completion(answer)`` separately (so the boundary
    is exact), concatenate them and append EOS. Answers repeat across people, so each
    distinct answer is tokenized once. ``prompt_format="chat"`` uses the tokenizer's chat
    template instead (``factlab.tokens.prompts``)."""
    from factlab.tokens.prompts import check_format, completion_text, prompt_text

    check_format(prompt_format)

    def prompt(q):
        return prompt_text(q, tokenizer, prompt_format)

    def completion(a):
        return completion_text(a, prompt_format)

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
