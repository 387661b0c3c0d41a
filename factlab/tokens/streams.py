"""Streams: the randomly addressable sequences a training run reads.

``stream.sequences(start, n)`` returns sequences ``start .. start+n-1`` of an infinite,
deterministic sequence, computed from the seed and the index alone. A run that resumes at
step s asks for sequence ``s * batch`` and gets exactly what an uninterrupted run would
have seen; nothing is iterated or replayed. Everything here is numpy (no torch).

The batch every stream returns (a dict of numpy arrays, one row per sequence):

- ``input_ids``, ``labels``: (n, seq_len) int64, ``labels = -100`` (:data:`IGNORE`) where
  no loss is taken; the model shifts labels internally (HF causal-LM convention), so
  ``labels[t]`` is predicted from positions ``< t``.
- per-row columns, 1-D int64 of length n, -1 meaning "none":
  ``example_id``: the ``example_id`` of the one document / QA example the row holds
  whole; -1 when the row holds several, or a fragment of one (concatenated packing).
  ``prompt_end`` (``QAStream(prompt_end=True)``): the row's index of its example's first
  answer token, where the row holds one example; -1 otherwise.
  Wrappers add more (:class:`~factlab.tokens.mixing.Tagged`: ``experience`` ...), and
  :class:`~factlab.tokens.mixing.Mixture` / ``Schedule`` keep every key of every source.
- A stream returns the same keys for every request (``sequences(k, 0)`` shows them).

``stream.model_inputs`` (a frozenset) names the batch keys a model's forward receives:
:data:`MODEL_INPUTS` (``input_ids``) by default, plus ``attention_mask`` where a stream
emits one and ``prompt_end`` where asked for (a prompt pool reads where the question
ends). Every other key except ``labels`` is bookkeeping (row, fact and experience ids)
and must never reach a forward: nothing may tell a model which experience a row came from.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

import numpy as np

from factlab.errors import FactlabError
from factlab.tokens.encode import EncodedDocs, EncodedQA

IGNORE = -100  # label of positions that take no loss
MODEL_INPUTS = frozenset({"input_ids"})  # batch keys a forward receives unless a stream says


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

    ``example_id`` of a row: the document's id where the row is exactly one document and
    its EOS (always with ``whole`` packing at a context below two documents; rare when
    concatenating), else -1.
    """

    model_inputs = MODEL_INPUTS

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
                EncodedQA(ids, offs, np.zeros(n, np.int32), enc.person, np.zeros(n, np.int16),
                          example_id=enc.example_id),
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
        return np.cumsum(span), span, self.enc.offsets[:-1][perm], perm

    def _tokens(self, epoch: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of epoch ``epoch``'s concatenated stream."""
        ends, span, src, _ = self._cache.get_or(epoch, self._epoch)
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
        example_id = np.empty(n, dtype=np.int64)
        k = start
        while k < start + n:  # one contiguous run per epoch touched
            e, j = divmod(k, spe)
            m = min(spe - j, start + n - k)
            out[k - start:k - start + m] = self._tokens(e, j * L, (j + m) * L).reshape(m, L)
            row_starts = np.arange(j, j + m, dtype=np.int64) * L
            ends, span, _, perm = self._cache.get_or(e, self._epoch)
            if self.mask_head:
                at_doc[k - start:k - start + m] = (row_starts == 0) | np.isin(row_starts, ends)
            d = np.searchsorted(ends, row_starts, side="right")  # document at the row's start
            alone = (ends[d] - span[d] == row_starts) & (ends[d] == row_starts + L)
            example_id[k - start:k - start + m] = np.where(alone, self.enc.example_id[perm[d]], -1)
            k += m
        labels = out.copy()
        if self.mask_head and not at_doc.all():
            is_eos = out == self.eos_id
            # first EOS of the row (a row without one is all fragment: mask it whole)
            first = np.where(is_eos.any(1), is_eos.argmax(1), L - 1)
            head = (np.arange(L)[None, :] <= first[:, None]) & ~at_doc[:, None]
            labels[head] = -100
        return {"input_ids": out, "labels": labels, "example_id": example_id}


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

    ``example_id`` of a row: its example's id where the row holds one example (every row
    with ``pack=False``), -1 where it holds several. ``prompt_end=True`` adds the per-row
    ``prompt_end`` (the column of the row's first answer token, ``answer_start``, where
    the row holds one example; -1 otherwise) and declares it a model input.
    """

    def __init__(self, enc: EncodedQA, seq_len: int, pad_id: int, seed: int = 0,
                 pack: bool = True, prompt_end: bool = False):
        self.enc, self.seq_len, self.pad_id, self.seed = enc, int(seq_len), int(pad_id), seed
        self.pack, self.prompt_end = bool(pack), bool(prompt_end)
        self.model_inputs = (MODEL_INPUTS | {"prompt_end"}) if self.prompt_end else MODEL_INPUTS
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

    def _pack(self, epoch: int, j0: int, m: int, ids_out, lab_out, row_out) -> None:
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
        one = np.diff(first[j0:j0 + m + 1]) == 1  # rows holding a single example
        head = perm[first[j0:j0 + m]]  # the first example of every row
        row_out["example_id"][:] = np.where(one, self.enc.example_id[head], -1)
        if self.prompt_end:
            row_out["prompt_end"][:] = np.where(one, self.enc.answer_start[head], -1)

    def sequences(self, start: int, n: int) -> dict:
        _check_range(start, n)
        ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        lab = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        rows = {"example_id": np.empty(n, dtype=np.int64)}
        if self.prompt_end:
            rows["prompt_end"] = np.empty(n, dtype=np.int64)
        k = start
        while k < start + n:
            e, j = self._locate(k)
            m = min(self.epoch_size(e) - j, start + n - k)
            r = slice(k - start, k - start + m)
            self._pack(e, j, m, ids[r], lab[r], {key: v[r] for key, v in rows.items()})
            k += m
        return {"input_ids": ids, "labels": lab, **rows}
