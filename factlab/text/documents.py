"""Bio documents and the vectorised bioS renderer.

Why vectorised: a world of 100k people with ``multi5+permute`` is 500k bios of six
sentences. Formatting them one sentence at a time in Python costs microseconds per
sentence; instead every random choice (template, order) is drawn as an array, every
compiled template is a row of string ids (literals and slots for name / possessive /
value), and one numpy gather + one ``str.join`` produce all texts. Spans fall out of a
cumulative sum over the piece lengths, so they are exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import numpy as np

from factlab.io import jstr
from factlab.text.augment import Augment, parse_augment
from factlab.text.templates import (FULL, N_MODES, NAME, NAME_FIRST, NAME_POSS, NAME_SENTENCES,
                                    N_PRONOUN_SLOTS, mode_index,
                                    PRON, VALUE, TemplateSet, compile_sentence)

CHUNK = 16384  # docs assembled per batch (bounds memory; results do not depend on it)


class Texts(Sequence):
    """Document texts held as one string plus [start, end) offsets — the layout of an
    Arrow string column. Rendering never creates one Python object per document; indexing
    or iterating slices the buffer (about a microsecond per document)."""

    __slots__ = ("blob", "start", "end")

    def __init__(self, blob: str, start, end):
        self.blob = blob
        self.start = np.asarray(start, dtype=np.int64)
        self.end = np.asarray(end, dtype=np.int64)

    @classmethod
    def empty(cls) -> Texts:
        return cls("", np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts: list[Texts]) -> Texts:
        shift = np.cumsum([0] + [len(p.blob) for p in parts[:-1]])
        return cls("".join(p.blob for p in parts),
                   np.concatenate([p.start + k for p, k in zip(parts, shift)]),
                   np.concatenate([p.end + k for p, k in zip(parts, shift)]))

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Texts(self.blob, self.start[i], self.end[i])
        return self.blob[self.start[i]:self.end[i]]

    def __iter__(self):
        blob = self.blob
        for a, b in zip(self.start.tolist(), self.end.tolist()):
            yield blob[a:b]

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"Texts({len(self)} documents, {len(self.blob)} characters)"


@dataclass
class Docs:
    """Rendered documents, columnar. ``spans[d, a]`` is the [start, end) character span of
    attribute ``a``'s value in ``text[d]`` (-1, -1 when the document does not state it)."""

    text: Sequence[str]  # a list, or Texts (one buffer + offsets) from the renderer
    person: np.ndarray  # (D,) int32, index into world.people
    entry: np.ndarray  # (D,) int32, which of the person's entries
    spans: np.ndarray  # (D, A, 2) int32
    attributes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.text)

    def records(self, names=None):
        """JSON-ready dicts (``names``: the people's names, to tag each record)."""
        attrs = self.attributes
        for d, (t, p, e) in enumerate(zip(self.text, self.person.tolist(), self.entry.tolist())):
            sp = self.spans[d].tolist()
            rec = {"id": d, "person": p}
            if names is not None:
                rec["name"] = names[p]
            rec["entry"] = e
            rec["text"] = t
            rec["spans"] = {a: s for a, s in zip(attrs, sp) if s[0] >= 0}
            yield rec

    def jsonl(self, names=None):
        """The same lines as ``dumps(record)`` for each of :meth:`records`, built directly
        (a world of 500k bios is written in seconds, not a minute)."""
        keys = [jstr(a) for a in self.attributes]
        spans = self.spans.tolist()
        for d, (t, p, e) in enumerate(zip(self.text, self.person.tolist(), self.entry.tolist())):
            sp = ",".join(f"{k}:[{s[0]},{s[1]}]" for k, s in zip(keys, spans[d]) if s[0] >= 0)
            name = f'"name":{jstr(names[p])},' if names is not None else ""
            yield f'{{"id":{d},"person":{p},{name}"entry":{e},"text":{jstr(t)},"spans":{{{sp}}}}}'

    def with_attributes(self, attributes) -> Docs:
        """The same documents over a longer attribute list (``self.attributes`` first, in
        order): the added attributes are stated nowhere (span -1, -1)."""
        attributes = tuple(attributes)
        if attributes == self.attributes:
            return self
        if attributes[:len(self.attributes)] != self.attributes:
            raise ValueError(f"attributes {attributes} do not extend {self.attributes}")
        pad = np.full((len(self), len(attributes) - len(self.attributes), 2), -1, np.int32)
        return Docs(self.text, self.person, self.entry,
                    np.concatenate([self.spans.reshape(len(self), -1, 2), pad], axis=1),
                    attributes)

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        parts = [p for p in parts if len(p)] or parts[:1]
        if all(isinstance(p.text, Texts) for p in parts):
            texts = Texts.concat([p.text for p in parts])
        else:
            texts = [t for p in parts for t in p.text]
        return Docs(texts, np.concatenate([p.person for p in parts]),
                    np.concatenate([p.entry for p in parts]),
                    np.concatenate([p.spans for p in parts]), parts[0].attributes)


class Compiled:
    """Every template of a TemplateSet compiled for every mode, as one ragged piece array.

    Group ``g < A`` holds attribute ``g``'s templates; group ``A`` the closing name
    sentences of ``reverse``. A *row* is one (group, template, mode, variant): its pieces
    are literal ids (>= 0) or slots (:data:`S_NAME`, :data:`S_POSS`, :data:`S_VALUE`).
    The 4 variants fold the joining space before a sentence and the ``\n`` that ends a
    document into the row's literals, so no separator pieces are needed at render time.
    """

    def __init__(self, templates: TemplateSet):
        groups = [templates.sentences[a] for a in templates.attributes] + [NAME_SENTENCES]
        self.G = len(groups)
        self.T = max(len(g) for g in groups)
        self.literals: list[str] = []
        lit_index: dict[str, int] = {}

        def lit(x: str) -> int:
            if x not in lit_index:
                lit_index[x] = len(self.literals)
                self.literals.append(x)
            return lit_index[x]

        n_rows = self.G * self.T * N_MODES * 4
        pieces: list[int] = []
        # int32 throughout the hot path: rendering is memory-bound
        self.row_start = np.zeros(n_rows + 1, dtype=np.int32)
        self.row_len = np.zeros(n_rows + 1, dtype=np.int32)  # last row: the empty row
        self.value_pos = np.full(n_rows + 1, -1, dtype=np.int32)
        for g, tpls in enumerate(groups):
            vslot = NAME if g == self.G - 1 else VALUE
            for t, tpl in enumerate(tpls):
                for kind in (PRON, NAME_FIRST, FULL):
                    for p in (*range(N_PRONOUN_SLOTS - 1), -1):
                        base = compile_sentence(tpl, kind, p, vslot)
                        m = mode_index(kind, p)
                        for variant in range(4):  # bit 1: leading space, bit 0: final "\n"
                            parts = list(base)
                            if variant & 2:
                                parts = ([" " + parts[0]] + parts[1:]) if isinstance(parts[0], str) \
                                    else [" "] + parts
                            if variant & 1:
                                parts = (parts[:-1] + [parts[-1] + "\n"]) \
                                    if isinstance(parts[-1], str) else parts + ["\n"]
                            r = self.row(g, t, m, variant)
                            self.row_start[r] = len(pieces)
                            self.row_len[r] = len(parts)
                            for k, x in enumerate(parts):
                                if isinstance(x, str):
                                    pieces.append(lit(x))
                                else:
                                    pieces.append(-x)  # slots are negative
                                    if x == VALUE:
                                        self.value_pos[r] = k
        self.empty_row = n_rows
        self.row_start[n_rows] = len(pieces)
        self.pieces = np.array(pieces, dtype=np.int32)
        self.n_templates = np.array([len(g) for g in groups], dtype=np.int64)

    def row(self, g, t, m, variant):
        return ((g * self.T + t) * N_MODES + m) * 4 + variant


def compiled_for(templates: TemplateSet) -> Compiled:
    """Compile once per TemplateSet object (cached on it)."""
    comp = templates.__dict__.get("_compiled")
    if comp is None:
        comp = templates.__dict__["_compiled"] = Compiled(templates)
    return comp


def draw_layout(spec: Augment, n: int, A: int, comp: Compiled, g: np.random.Generator):
    """All random choices for ``n`` people: per-doc template of each attribute, sentence
    order, and the name-sentence template (used by ``reverse``)."""
    E = spec.entries
    D = n * E
    nt = comp.n_templates
    if spec.redraw:
        tmpl = g.integers(0, nt[None, :A], size=(D, A))
    else:  # single: one template per attribute per person, shared by its entries
        tmpl = np.repeat(g.integers(0, nt[None, :A], size=(n, A)), E, axis=0)
    if spec.order == "permute":
        order = g.permuted(np.tile(np.arange(A), (D, 1)), axis=1)
    elif spec.order == "couple":
        pairs = g.permuted(np.tile(np.arange(A // 2), (D, 1)), axis=1)
        order = np.stack([2 * pairs, 2 * pairs + 1], axis=2).reshape(D, A)
    else:
        order = np.tile(np.arange(A), (D, 1))
    name_tmpl = g.integers(0, nt[A], size=D) if spec.reverse else None
    return tmpl, order, name_tmpl


def render_bios(table, ids, templates: TemplateSet, augment: str | Augment,
                g: np.random.Generator) -> Docs:
    """Render the bios of people ``ids`` of ``table`` with one augmentation.

    Every random choice is drawn first (so chunking never changes the result); chunks of
    documents are then assembled with array operations.
    """
    spec = parse_augment(augment) if isinstance(augment, str) else augment
    comp = compiled_for(templates)
    A = len(table.attributes)
    ids = np.asarray(ids, dtype=np.int64)
    if spec.order == "couple" and A != 6:
        raise ValueError("couple needs the six bioS attributes")
    tmpl, order, name_tmpl = draw_layout(spec, len(ids), A, comp, g)
    E = spec.entries
    static = np.array(comp.literals + [v for pool in table.pools for v in pool], dtype=object)
    static_len = np.fromiter(map(len, static), dtype=np.int32, count=len(static))
    pool_off = np.cumsum([len(comp.literals)] + [len(p) for p in table.pools])
    per = max(1, CHUNK // E)
    parts = []
    for lo in range(0, len(ids), per):
        hi = min(lo + per, len(ids))
        sl = slice(lo * E, hi * E)
        parts.append(_assemble(table, ids[lo:hi], E, spec, comp, static, static_len, pool_off,
                               tmpl[sl], order[sl], None if name_tmpl is None else name_tmpl[sl]))
    if not parts:
        return Docs(Texts.empty(), np.zeros(0, np.int32), np.zeros(0, np.int32),
                    np.zeros((0, A, 2), np.int32), table.attributes)
    return Docs.concat(parts)


def _assemble(table, ids, E, spec, comp, static, static_len, pool_off, tmpl, order, name_tmpl):
    n, A = len(ids), len(table.attributes)
    D = n * E
    pl = np.repeat(np.arange(n), E)  # local person of each doc
    codes = table.codes[ids][pl]  # (D, A)
    pron = table.pronoun[ids][pl].astype(np.int64)
    pidx = np.where(pron < 0, N_PRONOUN_SLOTS - 1, pron)

    names = [table.names[i] for i in ids.tolist()]
    extra = names + [s + "'s" for s in names]
    table_str = np.concatenate([static, np.array(extra, dtype=object)])
    table_len = np.concatenate([static_len, np.fromiter(map(len, extra), np.int32, 2 * n)])
    name_off, poss_off = len(static), len(static) + n

    # which row (template x mode x variant) renders each sentence slot of each doc
    S = A + (1 if spec.reverse else 0)
    attr_of = order if not spec.reverse else np.concatenate([order, np.full((D, 1), A)], axis=1)
    t_of = np.take_along_axis(tmpl, order, axis=1)
    if spec.reverse:
        t_of = np.concatenate([t_of, name_tmpl[:, None]], axis=1)
    present = np.ones((D, S), dtype=bool)
    present[:, :A] = np.take_along_axis(codes, order, axis=1) >= 0
    cols = np.arange(S)[None, :]
    first = np.argmax(present, axis=1)  # the first stated sentence carries the name
    last = S - 1 - np.argmax(present[:, ::-1], axis=1)
    kind = np.full((D, S), FULL if spec.fullname else PRON, dtype=np.int64)
    if not spec.fullname and not spec.reverse:
        kind[np.arange(D), first] = NAME_FIRST
    variant = (cols != first[:, None]) * 2 + (cols == last[:, None])
    r = comp.row(attr_of, t_of, kind * N_PRONOUN_SLOTS + pidx[:, None], variant)
    r = np.where(present, r, comp.empty_row).reshape(-1)

    # ragged gather of every piece of every sentence, in order
    lens = comp.row_len[r]
    ends = np.cumsum(lens, dtype=np.int32)
    starts = ends - lens
    total = int(ends[-1]) if len(ends) else 0
    piece = comp.pieces[np.arange(total, dtype=np.int32) -
                        np.repeat(starts - comp.row_start[r], lens)]
    slot = np.flatnonzero(piece < 0)  # name / possessive / value pieces
    sent = np.searchsorted(ends, slot, side="right")  # sentence of each slot piece
    d_of, a_of = sent // S, attr_of.reshape(-1)[sent]
    kinds = -piece[slot]
    val = pool_off[np.minimum(a_of, A - 1)] + codes[d_of, np.minimum(a_of, A - 1)]
    ids_ = piece.copy()
    ids_[slot] = np.where(kinds == NAME, name_off + pl[d_of],
                          np.where(kinds == NAME_POSS, poss_off + pl[d_of], val))

    # character offsets: one cumulative sum over all pieces
    plen = table_len[ids_]
    cend = np.cumsum(plen, dtype=np.int32)
    cstart = cend - plen
    doc_first = starts.reshape(D, S)[:, 0]
    doc_char0 = cstart[np.minimum(doc_first, max(total - 1, 0))]
    vp = comp.value_pos[r]
    has = vp >= 0
    at = np.where(has, starts + vp, 0)
    vstart = (cstart[at] - np.repeat(doc_char0, S)).reshape(D, S)
    vend = vstart + plen[at].reshape(D, S)
    has = has.reshape(D, S)
    spans = np.full((D, A + 1, 2), -1, dtype=np.int32)
    rows = np.arange(D)[:, None]
    spans[rows, attr_of, 0] = np.where(has, vstart, -1)
    spans[rows, attr_of, 1] = np.where(has, vend, -1)

    # one string for the chunk; every document ends with "\n" (folded into its last row)
    blob = "".join(table_str[ids_].tolist())
    doc_end = np.append(doc_char0[1:], len(blob)) - 1  # without the "\n"
    person = ids[pl].astype(np.int32)
    entry = np.tile(np.arange(E, dtype=np.int32), n)
    return Docs(Texts(blob, doc_char0, doc_end), person, entry, spans[:, :A], table.attributes)


def render_bios_reference(table, ids, templates: TemplateSet, augment: str | Augment,
                          g: np.random.Generator) -> Docs:
    """The plain way: one person, one sentence at a time, in Python.

    Same random draws and compiled templates as :func:`render_bios`, so the output must be
    identical; tests use it as an independent check and ``bench/worldgen.py`` as the
    baseline the vectorised renderer is timed against.
    """
    spec = parse_augment(augment) if isinstance(augment, str) else augment
    comp = compiled_for(templates)
    groups = [templates.sentences[a] for a in templates.attributes] + [NAME_SENTENCES]
    A = len(table.attributes)
    ids = np.asarray(ids, dtype=np.int64)
    tmpl, order, name_tmpl = draw_layout(spec, len(ids), A, comp, g)
    cache: dict = {}

    def parts(gr, t, kind, p):
        key = (gr, t, kind, p)
        if key not in cache:
            cache[key] = compile_sentence(groups[gr][t], kind, p, NAME if gr == A else VALUE)
        return cache[key]

    texts, person, entry, spans = [], [], [], []
    d = 0
    for i in ids.tolist():
        name = table.names[i]
        p = int(table.pronoun[i])
        for e in range(spec.entries):
            out, n, sp = [], 0, [(-1, -1)] * A
            seq = [(a, int(tmpl[d, a])) for a in order[d].tolist() if table.codes[i, a] >= 0]
            if spec.reverse:
                seq.append((A, int(name_tmpl[d])))
            for j, (a, t) in enumerate(seq):
                kind = FULL if spec.fullname else (NAME_FIRST if j == 0 and not spec.reverse
                                                   else PRON)
                if j:
                    out.append(" ")
                    n += 1
                for x in parts(a, t, kind, p):
                    if isinstance(x, str):
                        s = x
                    elif x == NAME:
                        s = name
                    elif x == NAME_POSS:
                        s = name + "'s"
                    else:
                        s = table.pools[a][table.codes[i, a]]
                        sp[a] = (n, n + len(s))
                    out.append(s)
                    n += len(s)
            texts.append("".join(out))
            person.append(i)
            entry.append(e)
            spans.append(sp)
            d += 1
    return Docs(texts, np.array(person, np.int32), np.array(entry, np.int32),
                np.array(spans, np.int32).reshape(len(texts), A, 2), table.attributes)
