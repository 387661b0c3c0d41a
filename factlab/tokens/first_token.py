"""First-token targets: which logits should predict the first token of an attribute value,
in bios (:func:`first_token_targets`) and in QA answers (:func:`qa_first_token_targets`).
Pure numpy over :class:`~factlab.tokens.encode.EncodedDocs` / ``EncodedQA``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factlab.tokens.encode import EncodedDocs, EncodedQA


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
