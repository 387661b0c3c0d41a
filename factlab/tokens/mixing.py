"""Streams made of streams: :class:`Mixture` (per-sequence choice of a source),
:class:`Schedule` (sources one after another) and :class:`Tagged` (a source with constant
per-row columns such as ``experience=2``).

All three keep every key of every source (the batch contract is in
:mod:`factlab.tokens.streams`): a 1-D per-row key that some source lacks is filled with
-1 on that source's rows, so a replay mixture of old and new data still says which
example and which experience each row holds; a 2-D key (input_ids, labels,
attention_mask, ...) that some source lacks, or shapes that disagree, is an error at
construction. The keys are read once from an empty request (``sequences(0, 0)``) and are
the same for every request, whichever sources it happens to draw from. ``model_inputs``
is the union of the sources'.
"""

from __future__ import annotations

import numpy as np

from factlab.errors import FactlabError
from factlab.tokens.streams import MODEL_INPUTS, _check_range, _LRU, _rng


def batch_keys(stream) -> dict:
    """What ``stream.sequences`` returns, read from an empty request: ``{key: (dtype,
    shape beyond the row axis)}`` in the stream's order (``()`` for a per-row column)."""
    got = stream.sequences(0, 0)
    return {k: (np.asarray(v).dtype, np.asarray(v).shape[1:]) for k, v in got.items()}


def model_inputs(stream) -> frozenset:
    """The batch keys a model's forward receives from ``stream`` (:data:`MODEL_INPUTS`
    for a stream that does not say)."""
    return frozenset(getattr(stream, "model_inputs", MODEL_INPUTS))


def _union(streams, who: str) -> tuple[dict, set]:
    """Keys of all ``streams`` -> ((dtype, shape) per key, the keys some source lacks)."""
    each = [batch_keys(s) for s in streams]
    names = list(dict.fromkeys(k for keys in each for k in keys))
    union, partial = {}, set()
    for k in names:
        have = [keys[k] for keys in each if k in keys]
        shapes = {shape for _, shape in have}
        if len(shapes) > 1:
            raise FactlabError(f"{who}: key {k!r} has shapes {sorted(shapes)} beyond the row "
                               f"axis in different streams")
        shape = shapes.pop()
        dtype = np.result_type(*(d for d, _ in have))
        if len(have) < len(streams):
            if shape != ():
                lacking = [i for i, keys in enumerate(each) if k not in keys]
                raise FactlabError(f"{who}: {len(shape) + 1}-D key {k!r} is missing from "
                                   f"stream(s) {lacking}; only per-row (1-D) keys can be "
                                   f"filled in")
            dtype = np.result_type(dtype, np.int64)
            partial.add(k)
        union[k] = (dtype, shape)
    return union, partial


def _check_keys(got: dict, keys: dict, who: str) -> None:
    extra = set(got) - set(keys)
    if extra:
        raise FactlabError(f"{who}: a source returned keys {sorted(extra)} that its empty "
                           f"request did not (a stream must return the same keys every time)")


class Mixture:
    """Sequences drawn from several streams: sequence ``k`` comes wholly from stream ``i``
    with probability ``probs[i]`` (paper §3 mixed training: all-QA with p=0.8, else
    all-bio). The j-th time stream ``i`` is picked it contributes its j-th sequence, so
    each source keeps its own order and epochs.

    Choices are drawn in blocks of :attr:`BLOCK` with ``default_rng([seed, block])``;
    per-block counts are cumulated lazily and kept, so ``sequences(k, n)`` for k in the
    millions costs one pass over the blocks before k the first time, then O(n).

    Every key of every source is kept; a row's per-row key is -1 where its source lacks it.

    ``run``: rows come in runs of ``run`` consecutive sequences from one source (one choice
    per run; ``run=batch_size`` makes every batch all one source). Mixed training with
    one question per row uses it: an all-QA batch is then trimmed to its questions'
    length instead of being padded to the bios' beside it.
    """

    BLOCK = 4096

    def __init__(self, streams: list, probs: list[float], seed: int = 0, run: int = 1):
        if not streams or len(streams) != len(probs):
            raise FactlabError(f"Mixture: {len(streams)} streams but {len(probs)} probs")
        lens = {int(s.seq_len) for s in streams}
        if len(lens) != 1:
            raise FactlabError(f"Mixture: streams have different seq_len {sorted(lens)}")
        p = np.asarray(probs, dtype=np.float64)
        if (p < 0).any() or not np.isfinite(p).all() or abs(p.sum() - 1) > 1e-6:
            raise FactlabError(f"Mixture: probs must be >= 0 and sum to 1, got {list(probs)}")
        if int(run) < 1:
            raise FactlabError(f"Mixture: run must be >= 1, got {run}")
        self.streams, self.probs, self.seed, self.run = list(streams), p, seed, int(run)
        self.seq_len = lens.pop()
        self._cdf = np.cumsum(p)
        self._cdf[-1] = 1.0
        self._before = [np.zeros(len(streams), dtype=np.int64)]  # picks before block b
        self._blocks = _LRU(8)
        self._keys, self._partial = _union(self.streams, "Mixture")
        self.model_inputs = frozenset().union(*map(model_inputs, self.streams))

    @property
    def sequences_per_epoch(self) -> int:
        """Mixture sequences that take every source through one epoch, in expectation."""
        return int(max(np.ceil(s.sequences_per_epoch / q)
                       for s, q in zip(self.streams, self.probs) if q > 0))

    def _runs(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For runs ``r``: the stream each is drawn from and its rank among that stream's
        runs."""
        blocks = r // self.BLOCK
        src = np.empty(len(r), dtype=np.int64)
        idx = np.empty(len(r), dtype=np.int64)
        for b in np.unique(blocks).tolist():
            while len(self._before) <= b:  # cumulate counts up to block b
                nb = len(self._before) - 1
                self._before.append(self._before[nb] + self._blocks.get_or(nb, self._block)[2])
            c, rank, _ = self._blocks.get_or(b, self._block)
            m = blocks == b
            pos = r[m] - b * self.BLOCK
            src[m] = c[pos]
            idx[m] = self._before[b][c[pos]] + rank[pos]
        return src, idx

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
        src, idx = self._runs(k // self.run)
        return src, idx * self.run + k % self.run

    def sequences(self, start: int, n: int) -> dict:
        src, idx = self.sources(start, n)
        out = {k: np.full((n, *shape), -1, dtype) if k in self._partial else
               np.empty((n, *shape), dtype) for k, (dtype, shape) in self._keys.items()}
        for s in np.unique(src).tolist():
            rows = np.flatnonzero(src == s)
            j = idx[rows]  # consecutive by construction
            got = self.streams[s].sequences(int(j[0]), len(j))
            _check_keys(got, self._keys, "Mixture")
            for k, v in got.items():
                out[k][rows] = v
        return out


class Schedule:
    """Streams one after another: the first ``lengths[0]`` sequences come from
    ``streams[0]`` (its sequences 0, 1, ...), the next ``lengths[1]`` from ``streams[1]``
    (again from its sequence 0), and so on; the last stream runs on without end.

    A curriculum over packings: the CPU quickstart memorises bios packed whole (fast, but
    each person sits at position 0 of its sequence) and then packs them ``named`` so that
    a name found after other text is looked up too. Addressed by sequence index like every
    stream here, so a resumed run sees the same data. Every key of every stream is kept;
    a per-row key is -1 on the rows of a stream that lacks it.
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
        self._keys, self._partial = _union(self.streams, "Schedule")
        self.model_inputs = frozenset().union(*map(model_inputs, self.streams))

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
            parts.append(self._fill(self.streams[i].sequences(k - int(self.starts[i]), m), m))
            k += m
        if not parts:  # n == 0
            return self._fill({}, 0)
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in self._keys}

    def _fill(self, got: dict, m: int) -> dict:
        """``got`` with the keys of every stream, in one order; missing per-row keys -1."""
        _check_keys(got, self._keys, "Schedule")
        return {k: got[k].astype(dtype, copy=False) if k in got else
                np.full((m, *shape), -1, dtype) for k, (dtype, shape) in self._keys.items()}


class Tagged:
    """``stream`` with constant per-row columns added: every row of
    ``Tagged(stream, experience=2)`` carries ``experience = 2`` (1-D int64) beside the
    stream's own keys, so a mixture of old and new experiences (replay, joint training)
    still says where each row came from. Tags are bookkeeping, never model inputs
    (``model_inputs`` is the stream's); values are ints >= 0, since -1 means "none".
    """

    def __init__(self, stream, **cols):
        if not cols:
            raise FactlabError("Tagged: no columns given (e.g. Tagged(stream, experience=0))")
        for k, v in cols.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise FactlabError(f"Tagged: {k}={v!r} must be an int >= 0")
        clash = sorted(set(cols) & set(batch_keys(stream)))
        if clash:
            raise FactlabError(f"Tagged: the stream already returns {clash}")
        self.stream, self.cols = stream, {k: int(v) for k, v in cols.items()}
        self.seq_len = stream.seq_len
        self.model_inputs = model_inputs(stream)

    @property
    def sequences_per_epoch(self) -> int:
        return self.stream.sequences_per_epoch

    def sequences(self, start: int, n: int) -> dict:
        got = dict(self.stream.sequences(start, n))
        for k, v in self.cols.items():
            got[k] = np.full(n, v, dtype=np.int64)
        return got
