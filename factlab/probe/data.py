"""Probe examples: inputs, read positions and per-task labels, built from a world and a
tokenizer (numpy only, no torch).

P-probing (paper §5): the input is ``<bos>`` + one bio of the person (entry ``entry``),
truncated to the model's context. The bio's character spans (recorded by the renderer)
give the first token of each attribute value (:func:`~factlab.tokens.encode.encode_docs`);
the read positions ``p1 < p2 < ... < p6`` are the tokens just before those first tokens,
in order of appearance. Q-probing: the input is ``<bos> full name <eos>`` and the one read
position is the final ``<eos>``.

Tasks (the same for both kinds), classes compacted to ``0..C-1`` over the people probed:

- ``birth_date/month``: the month (12 classes). The paper calls it the birth date's
  first-token task; with GPT-2's tokenizer a month name is one token, with a small world
  tokenizer it often is not (" J" starts January, June and July), so we classify the
  month itself, read from the value's first word.
- ``{attr}/first_token``: the first token of the value as the model writes it in QA
  answers and bios (the first token of ``" " + value``).
- ``{attr}/value``: the whole value (its id in the attribute's pool).

Birth date gets only the month task (a whole-date task would have one class per person);
a user world without month-style dates gets first-token and value tasks for every
attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factlab.errors import FactlabError
from factlab.tokens.encode import encode_docs
from factlab.tokens.streams import IGNORE
from factlab.world.pools import MONTHS


@dataclass
class Task:
    """One classification task: ``classes[k]`` names class ``k``."""

    name: str  # e.g. "university/value"
    attribute: int  # index into world.attributes
    target: str  # "month" | "first_token" | "value"
    classes: list[str]
    # each class as the token ids the model writes for it (the month or value after a
    # space, the first token itself): what the tied head (ProbeModel head="tied") scores
    class_tokens: list[list[int]] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class ProbeData:
    """Every probed person once (rows ordered by person id).

    ``input_ids[i, :lengths[i]]`` is row ``i``'s input (right-padded with ``pad_id``);
    the probe reads the last hidden layer at ``positions[i, k]`` (-1: absent, e.g. a value
    cut off by the context); ``targets[i, t]`` is task ``t``'s class (-100: no value).
    ``order[i, k]`` is the attribute whose value follows position ``k`` (P-probing).
    ``train`` / ``test`` are row indices: the probe trains on the first, is scored on the
    second (disjoint people).
    """

    kind: str
    input_ids: np.ndarray  # (N, L) int64
    lengths: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N, P) int64
    position_names: list[str]
    targets: np.ndarray  # (N, T) int64
    person: np.ndarray  # (N,) int64
    tasks: list[Task]
    pad_id: int
    order: np.ndarray | None = None  # (N, P) int64 attribute index, -1 absent
    train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.person)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise FactlabError(f"no probe task {name!r} (known: "
                               f"{', '.join(self.task_names)})") from None

    def relabel(self, name: str, labels, class_tokens=None) -> None:
        """Replace task ``name``'s labels (one integer per row, < 0: absent) — control
        tasks, e.g. random labels that no model can know. ``class_tokens``: the tokens of
        each distinct label in sorted order (needed by the tied head; without them the
        task has none and a tied probe refuses it)."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(self),):
            raise FactlabError(f"relabel {name!r}: need {len(self)} labels, got {labels.shape}")
        t = self.task_index(name)
        ok = labels >= 0
        uniq, inv = np.unique(labels[ok], return_inverse=True)
        self.targets[:, t] = IGNORE
        self.targets[ok, t] = inv
        self.tasks[t].classes = [str(int(u)) for u in uniq]
        self.tasks[t].class_tokens = [] if class_tokens is None else [
            [int(i) for i in c] for c in class_tokens]

    def chance(self, t: int) -> tuple[float | None, float]:
        """(majority, uniform) chance of task ``t``: the test accuracy of always answering
        the most frequent *training* class, and 1 / number of classes."""
        ytr = self.targets[self.train, t]
        yte = self.targets[self.test, t]
        ytr, yte = ytr[ytr >= 0], yte[yte >= 0]
        uniform = 1.0 / max(1, self.tasks[t].n_classes)
        if not len(ytr) or not len(yte):
            return None, uniform
        major = np.bincount(ytr).argmax()
        return float((yte == major).mean()), uniform


# --------------------------------------------------------------------------- people

def split_people(n: int, train_fraction: float = 0.5, seed: int = 0,
                 cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probe-train and probe-test people: a seeded permutation of ``range(n)`` (the first
    ``cap`` of it when given), cut at ``train_fraction``. Both sorted, disjoint."""
    perm = np.random.default_rng([int(seed), 0x9B0E]).permutation(n)
    if cap:
        perm = perm[:cap]
    if len(perm) < 4:
        raise FactlabError(f"probing needs at least 4 people, got {len(perm)}")
    k = min(max(int(round(len(perm) * train_fraction)), 1), len(perm) - 1)
    return np.sort(perm[:k]), np.sort(perm[k:])


# --------------------------------------------------------------------------- tasks

def _is_month_date(attr: str, values: list[str]) -> bool:
    return attr == "birth_date" and bool(values) and all(
        v.split(" ", 1)[0] in MONTHS for v in values)


def _written(tokenizer, values: list[str]) -> list[list[int]]:
    """Each value's tokens as an answer or a bio writes it (after a space)."""
    from factlab.text.qa import completion

    if not values:
        return []
    return [list(x) for x in
            tokenizer([completion(v) for v in values], add_special_tokens=False)["input_ids"]]


def _compact(labels: np.ndarray, names_of) -> tuple[np.ndarray, list[str]]:
    """Labels (any ints, <0 absent) -> 0..C-1 (sorted order), IGNORE absent; class names."""
    out = np.full(len(labels), IGNORE, dtype=np.int64)
    ok = labels >= 0
    uniq, inv = np.unique(labels[ok], return_inverse=True)
    out[ok] = inv
    return out, [names_of(int(u)) for u in uniq]


def probe_tasks(world, tokenizer, people, names: list[str] | None = None):
    """The tasks and a (len(people), T) target matrix for ``people`` (indices into
    ``world.people``). ``names``: keep only these tasks, in the canonical order."""
    table = world.people
    people = np.asarray(people, dtype=np.int64)
    tasks, cols = [], []
    for a, attr in enumerate(table.attributes):
        codes = table.codes[people, a].astype(np.int64)
        pool = table.pools[a]
        ucodes = np.unique(codes[codes >= 0])
        uvals = [pool[c] for c in ucodes.tolist()]
        if _is_month_date(attr, uvals):
            month = np.array([MONTHS.index(v.split(" ", 1)[0]) for v in uvals], np.int64)
            lab = np.full(len(codes), IGNORE, np.int64)
            ok = codes >= 0
            lab[ok] = month[np.searchsorted(ucodes, codes[ok])]
            tasks.append(Task(f"{attr}/month", a, "month", list(MONTHS),
                              _written(tokenizer, MONTHS)))
            cols.append(lab)
            continue
        written = _written(tokenizer, uvals)  # tokenised once: first tokens and values
        first = np.array([x[0] if x else -1 for x in written], dtype=np.int64)
        tok_of = np.full(len(codes), -1, np.int64)
        ok = codes >= 0
        tok_of[ok] = first[np.searchsorted(ucodes, codes[ok])]
        lab, cls = _compact(tok_of, lambda i: tokenizer.decode([i]))
        firsts = np.unique(tok_of[tok_of >= 0]).tolist()  # _compact's class order
        tasks.append(Task(f"{attr}/first_token", a, "first_token", cls,
                          [[int(i)] for i in firsts]))
        cols.append(lab)
        lab, cls = _compact(codes, lambda c: pool[c])
        tasks.append(Task(f"{attr}/value", a, "value", cls, written))  # cls == uvals
        cols.append(lab)
    if names is not None:
        known = [t.name for t in tasks]
        bad = [n for n in names if n not in known]
        if bad:
            raise FactlabError(f"no probe task {bad[0]!r} (known: {', '.join(known)})")
        keep = [i for i, t in enumerate(tasks) if t.name in set(names)]
        tasks, cols = [tasks[i] for i in keep], [cols[i] for i in keep]
    if not tasks:
        raise FactlabError("no probe tasks")
    return tasks, np.stack(cols, axis=1)


# --------------------------------------------------------------------------- inputs

def _bos(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    bos = tokenizer.eos_token_id if bos is None else bos
    if bos is None:
        raise FactlabError("tokenizer has neither a bos nor an eos token")
    return int(bos)


def _pad(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def p_probe_inputs(world, tokenizer, people, *, context: int, entry: int = 0):
    """``(input_ids, lengths, positions, order)`` for P-probing ``people``: ``<bos>`` + bio
    entry ``entry``, at most ``context`` tokens; ``positions[i, k]`` is the token before
    the k-th value (in order of appearance), ``order[i, k]`` that value's attribute."""
    from factlab.text.documents import Docs

    bios = world.bios()
    people = np.asarray(people, dtype=np.int64)
    pick = np.flatnonzero(bios.entry == entry)
    doc_of = np.full(len(world.people), -1, np.int64)
    doc_of[bios.person[pick]] = pick
    docs = doc_of[people]
    if (docs < 0).any():
        i = int(people[np.flatnonzero(docs < 0)[0]])
        raise FactlabError(f"person {i} has no bio entry {entry} (probe entry={entry})")
    sub = Docs([bios.text[d] for d in docs.tolist()], bios.person[docs], bios.entry[docs],
               bios.spans[docs], bios.attributes)
    enc = encode_docs(tokenizer, sub)
    lens = np.minimum(enc.lengths + 1, context)  # + bos
    N, W = len(docs), int(lens.max()) if len(docs) else 1
    ids = np.full((N, W), _pad(tokenizer), dtype=np.int64)
    ids[:, 0] = _bos(tokenizer)
    col = np.arange(W - 1)[None, :]
    inside = col < (lens - 1)[:, None]
    ids[:, 1:][inside] = enc.ids[(enc.offsets[:-1, None] + col)[inside]]
    # value a's first token sits at vt + 1 (after bos): the token before it is vt
    vt = enc.value_tok.astype(np.int64)
    ok = (vt >= 0) & (vt + 1 < lens[:, None])
    key = np.where(ok, vt, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    pos = np.take_along_axis(np.where(ok, vt, -1), order, axis=1)
    order = np.where(pos >= 0, order, -1)
    return ids, lens.astype(np.int64), pos, order


def q_probe_inputs(world, tokenizer, people, read: str = "end"):
    """``(input_ids, lengths, positions)`` for Q-probing: ``<bos> full name <eos>``, read at
    the final ``<eos>``. The name is encoded after :func:`~factlab.tokens.encode.doc_prefix`
    (a space for byte-level BPE), as in every bio and question the model was trained on:
    without it the first name is other tokens (``C|al|eb`` instead of `` Caleb``) and
    the probe reads a name the model never saw (it read chance on the quickstart's
    models). ``read="name"``: no ``<eos>``, read at the name's last token."""
    from factlab.tokens.encode import doc_prefix

    people = np.asarray(people, dtype=np.int64)
    pre = doc_prefix(tokenizer)
    names = [pre + world.people.names[i] for i in people.tolist()]
    enc = tokenizer(names, add_special_tokens=False)["input_ids"] if names else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FactlabError("tokenizer has no eos token (Q-probing ends the name with it)")
    end = [int(eos)] if read == "end" else []
    rows = [[_bos(tokenizer), *e, *end] for e in enc]
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.full((len(rows), int(lens.max()) if len(rows) else 1), _pad(tokenizer), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lens, (lens - 1)[:, None]


def probe_data(world, tokenizer, kind: str, train_people, test_people, *, context: int,
               entry: int = 0, tasks: list[str] | None = None,
               q_read: str = "end") -> ProbeData:
    """Inputs, positions and targets for ``train_people`` + ``test_people`` (disjoint)."""
    train_people = np.asarray(train_people, dtype=np.int64)
    test_people = np.asarray(test_people, dtype=np.int64)
    if np.intersect1d(train_people, test_people).size:
        raise FactlabError("probe train and test people overlap")
    people = np.union1d(train_people, test_people)
    task_list, targets = probe_tasks(world, tokenizer, people, tasks)
    order = None
    if kind == "p":
        ids, lens, pos, order = p_probe_inputs(world, tokenizer, people, context=context,
                                               entry=entry)
        names = [f"p{k + 1}" for k in range(pos.shape[1])]
    elif kind == "q":
        ids, lens, pos = q_probe_inputs(world, tokenizer, people, q_read)
        if lens.max(initial=0) > context:
            raise FactlabError(f"a name is {int(lens.max())} tokens with <bos>/<eos>, longer "
                               f"than the model's context {context}")
        names = [q_read]
    else:
        raise FactlabError(f"unknown probe kind {kind!r} (p or q)")
    return ProbeData(kind, ids, lens, pos, names, targets, people, task_list, _pad(tokenizer),
                     order, np.searchsorted(people, train_people),
                     np.searchsorted(people, test_people))


# --------------------------------------------------------------------------- stream

class ProbeStream:
    """The loop's view of the probe-training rows: ``sequences(start, n)`` returns rows
    ``start .. start+n-1`` of an endless sequence of epochs, each a seeded permutation of
    ``rows`` (deterministic in start and n, as every factlab stream)."""

    def __init__(self, data: ProbeData, rows=None, seed: int = 0):
        self.data = data
        self.rows = np.asarray(data.train if rows is None else rows, dtype=np.int64)
        if not len(self.rows):
            raise FactlabError("ProbeStream: no rows to train on")
        self.seed = seed
        self.seq_len = int(data.input_ids.shape[1])
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.rows))
        return self._perms[epoch]

    def sequences(self, start: int, n: int) -> dict:
        if start < 0 or n < 0:
            raise FactlabError(f"sequences(start={start}, n={n}): both must be >= 0")
        k = np.arange(start, start + n, dtype=np.int64)
        N = len(self.rows)
        r = np.empty(n, dtype=np.int64)
        for e in np.unique(k // N).tolist():
            m = k // N == e
            r[m] = self.rows[self._perm(e)[k[m] % N]]
        d = self.data
        return {"input_ids": d.input_ids[r], "positions": d.positions[r], "targets": d.targets[r]}
