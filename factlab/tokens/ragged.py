"""Ragged arrays: many variable-length token sequences held in two flat arrays.

Item ``i`` is ``ids[offsets[i]:offsets[i+1]]``; every other field of a subclass is a
per-item *column* with one entry per item along its first axis (``person`` (N,),
``value_tok`` (N, A), ``example_id`` (N,), ...). 500k documents are a few numpy arrays,
not 500k Python lists, and a subset or a union of encodings is one gather, not a
re-encode.

Why one base: replay and joint training build their training data from pieces of other
data (a replay buffer takes a subset of old experiences with :meth:`Ragged.take` and joins
it to the new one with :meth:`Ragged.concat`), and a fact must keep its identity through
both. ``example_id`` is therefore a column like any other (int64, default ``arange(N)``):
take and concat carry it along, and the streams put it on every row they build from one
item (see :mod:`factlab.tokens.streams`). Ids are whatever the caller gives; two encodings
made separately both count from 0, so give one of them its own ids
(``dataclasses.replace(enc, example_id=...)``) before joining them if they must differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from factlab.errors import FactlabError

_FLAT = ("ids", "offsets")


@dataclass
class Ragged:
    """Flat token ids + offsets + per-item columns (the fields a subclass adds, and
    ``example_id``). Subclasses add columns as plain dataclass fields."""

    ids: np.ndarray  # (T,) token ids
    offsets: np.ndarray  # (N+1,) int64; offsets[0] == 0, offsets[-1] == T, non-decreasing
    example_id: np.ndarray | None = field(default=None, kw_only=True)  # (N,) int64

    def __post_init__(self):
        off = np.asarray(self.offsets)
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(self.ids) \
                or (len(off) > 1 and (np.diff(off) < 0).any()):
            raise FactlabError(f"{type(self).__name__}: offsets must rise from 0 to "
                               f"len(ids)={len(self.ids)}")
        n = len(off) - 1
        if self.example_id is None:
            self.example_id = np.arange(n, dtype=np.int64)
        else:
            self.example_id = np.asarray(self.example_id, dtype=np.int64)
        for name in self.columns():
            col = getattr(self, name)
            if col.ndim < 1 or len(col) != n:
                raise FactlabError(f"{type(self).__name__}.{name}: {len(col) if col.ndim else 0}"
                                   f" entries for {n} items")

    @classmethod
    def columns(cls) -> list[str]:
        """Names of the per-item columns (every field but ``ids`` and ``offsets``)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _FLAT]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def take(self, idx):
        """Items ``idx`` (indices in ``[0, len)``, any order, repeats allowed, or a boolean
        mask), as the same type: their tokens regathered and every column indexed alike."""
        idx = np.asarray(idx)
        n = len(self)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise FactlabError(f"take: mask of shape {idx.shape} for {n} items")
            idx = np.flatnonzero(idx)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise FactlabError(f"take: indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise FactlabError(f"take: indices must lie in [0, {n}), got "
                               f"{int(idx.min())}..{int(idx.max())}")
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lens) + np.arange(int(offsets[-1]))
        cols = {name: getattr(self, name)[idx] for name in self.columns()}
        return dataclasses.replace(self, ids=self.ids[gather], offsets=offsets, **cols)

    @classmethod
    def concat(cls, parts):
        """``parts`` (a non-empty sequence of one type) joined end to end: items of
        ``parts[0]`` first, then ``parts[1]``'s, ... with every column concatenated.
        Columns must agree in shape beyond the item axis (e.g. the same attributes)."""
        parts = list(parts)
        if not parts:
            raise FactlabError(f"{cls.__name__}.concat: nothing to concatenate")
        kind = type(parts[0])
        if not issubclass(kind, cls) or any(type(p) is not kind for p in parts):
            raise FactlabError(f"{cls.__name__}.concat: parts of types "
                               f"{sorted({type(p).__name__ for p in parts})}")
        cols = {}
        for name in kind.columns():
            arrays = [getattr(p, name) for p in parts]
            shapes = {a.shape[1:] for a in arrays}
            if len(shapes) > 1:
                raise FactlabError(f"{kind.__name__}.concat: column {name!r} has shapes "
                                   f"{sorted(shapes)} beyond the item axis")
            cols[name] = np.concatenate(arrays)
        base = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] +
                                 [p.offsets[1:].astype(np.int64) + b for p, b in zip(parts, base)])
        return kind(ids=np.concatenate([p.ids for p in parts]), offsets=offsets, **cols)
