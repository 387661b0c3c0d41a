"""Bio documents and the vectorised bioS renderer.

Why vectorised: a world of 100k people with ``multi5+permute`` is 500k bios of six
sentences. Formatting them one sentence at a time in Python costs microseconds per
sentence; instead every random choice (template, order) is drawn as an array, every
compiled template is a row of string ids (literals and slots for name / possessive /
value), and one numpy gather + one ``str.join`` produce all texts. Spans fall out of a
cumulative sum over the piece lengths, so they are exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from factlab.text.augment import Augment, parse_augment
from factlab.text.templates import (FULL, N_MODES, NAME, NAME_FIRST, NAME_POSS, NAME_SENTENCES,
                                    PRON, VALUE, TemplateSet, compile_sentence)

CHUNK = 16384  # docs assembled per batch (bounds memory; results do not depend on it)


@dataclass
class Docs:
    """Rendered documents, columnar. ``spans[d, a]`` is the [start, end) character span of
    attribute ``a``'s value in ``text[d]`` (-1, -1 when the document does not state it)."""

    text: list[str]
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

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        parts = [p for p in parts if len(p)] or parts[:1]
        return Docs([t for p in parts for t in p.text], np.concatenate([p.person for p in parts]),
                    np.concatenate([p.entry for p in parts]),
                    np.concatenate([p.spans for p in parts]), parts[0].attributes)


class Compiled:
    """Every template of a TemplateSet compiled for every mode, as padded index arrays.

    Group ``g < A`` is attribute ``g``'s templates; group ``A`` holds the closing name
    sentences of ``reverse``. Row layout of one compiled sentence: literal, slot, literal,
    slot, ..., literal (K slots, padded with empty literals and NONE slots).
    """

    def __init__(self, templates: TemplateSet):
        groups = [templates.sentences[a] for a in templates.attributes] + [NAME_SENTENCES]
        A1 = len(groups)
        T = max(len(g) for g in groups)
        compiled = {}
        K = 1
        for g, tpls in enumerate(groups):
            vslot = NAME if g == A1 - 1 else VALUE
            for t, tpl in enumerate(tpls):
                for kind in (PRON, NAME_FIRST, FULL):
                    for p in (0, 1, 2, -1):
                        parts = compile_sentence(tpl, kind, p, vslot)
                        compiled[g, t, kind * 4 + (3 if p < 0 else p)] = parts
                        K = max(K, sum(1 for x in parts if not isinstance(x, str)))
        self.literals: list[str] = [""]
        lit_index = {"": 0}
        self.lit = np.zeros((A1, T, N_MODES, K + 1), dtype=np.int32)
        self.slot = np.zeros((A1, T, N_MODES, K), dtype=np.int8)
        self.vcol = np.full((A1, T, N_MODES), -1, dtype=np.int8)  # which slot holds VALUE
        for (g, t, m), parts in compiled.items():
            k = 0
            for x in parts:
                if isinstance(x, str):
                    if x not in lit_index:
                        lit_index[x] = len(self.literals)
                        self.literals.append(x)
                    self.lit[g, t, m, k] = lit_index[x]
                else:
                    self.slot[g, t, m, k] = x
                    if x == VALUE:
                        self.vcol[g, t, m] = k
                    k += 1
        self.sep = len(self.literals)
        self.literals.append(" ")
        self.n_templates = np.array([len(g) for g in groups], dtype=np.int64)
        self.K = K


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
    """Render the bios of people ``ids`` of ``table`` with one augmentation."""
    spec = parse_augment(augment) if isinstance(augment, str) else augment
    comp = compiled_for(templates)
    A = len(table.attributes)
    ids = np.asarray(ids, dtype=np.int64)
    if spec.order == "couple" and A != 6:
        raise ValueError("couple needs the six bioS attributes")
    tmpl, order, name_tmpl = draw_layout(spec, len(ids), A, comp, g)
    E = spec.entries
    static = np.array(comp.literals + [v for pool in table.pools for v in pool], dtype=object)
    static_len = np.fromiter((len(s) for s in static), dtype=np.int64, count=len(static))
    pool_off = np.cumsum([len(comp.literals)] + [len(p) for p in table.pools])
    out = []
    per = max(1, CHUNK // E)
    for lo in range(0, len(ids), per):
        hi = min(lo + per, len(ids))
        sl = slice(lo * E, hi * E)
        out.append(_assemble(table, ids[lo:hi], E, spec, comp, static, static_len, pool_off,
                             tmpl[sl], order[sl], None if name_tmpl is None else name_tmpl[sl]))
    if not out:
        return Docs([], np.zeros(0, np.int32), np.zeros(0, np.int32),
                    np.zeros((0, A, 2), np.int32), table.attributes)
    return Docs.concat(out)


def _assemble(table, ids, E, spec, comp, static, static_len, pool_off, tmpl, order, name_tmpl):
    n, A = len(ids), len(table.attributes)
    D = n * E
    pl = np.repeat(np.arange(n), E)  # local person of each doc
    codes = table.codes[ids][pl]  # (D, A)
    pron = table.pronoun[ids][pl].astype(np.int64)
    pidx = np.where(pron < 0, 3, pron)

    names = [table.names[i] for i in ids.tolist()]
    table_str = np.concatenate([static, np.array(names + [s + "'s" for s in names], dtype=object)])
    table_len = np.concatenate([static_len, np.fromiter(
        (len(s) for s in table_str[len(static):]), dtype=np.int64, count=2 * n)])
    name_off, poss_off = len(static), len(static) + n

    S = A + (1 if spec.reverse else 0)
    rows = np.arange(D)[:, None]
    attr_of = order if not spec.reverse else np.concatenate([order, np.full((D, 1), A)], axis=1)
    t_of = np.take_along_axis(tmpl, order, axis=1)
    if spec.reverse:
        t_of = np.concatenate([t_of, name_tmpl[:, None]], axis=1)
    present = np.ones((D, S), dtype=bool)
    present[:, :A] = np.take_along_axis(codes, order, axis=1) >= 0
    first = np.argmax(present, axis=1)  # the first stated sentence carries the name
    kind = np.full((D, S), FULL if spec.fullname else PRON, dtype=np.int64)
    if not spec.fullname and not spec.reverse:
        kind[np.arange(D), first] = NAME_FIRST
    mode = kind * 4 + pidx[:, None]

    lit = comp.lit[attr_of, t_of, mode]  # (D, S, K+1)
    slot = comp.slot[attr_of, t_of, mode]  # (D, S, K)
    vcol = comp.vcol[attr_of, t_of, mode].astype(np.int64)  # (D, S)
    codes_ext = np.concatenate([codes, np.zeros((D, 1), codes.dtype)], axis=1)
    val = pool_off[np.minimum(attr_of, A - 1)] + np.take_along_axis(codes_ext, attr_of, axis=1)
    pl_col = pl[:, None, None]
    sid = np.where(slot == NAME, name_off + pl_col,
          np.where(slot == NAME_POSS, poss_off + pl_col,
          np.where(slot == VALUE, val[:, :, None], 0)))
    sep = np.where(present & (np.arange(S)[None, :] != first[:, None]), comp.sep, 0)
    W = 2 * comp.K + 2
    ids_ = np.empty((D, S, W), dtype=np.int64)
    ids_[:, :, 0] = sep
    ids_[:, :, 1::2] = lit
    ids_[:, :, 2::2] = sid
    ids_[~present] = 0

    lens = table_len[ids_]  # (D, S, W)
    flat_len = lens.reshape(D, S * W)
    ends = np.cumsum(flat_len, axis=1)
    starts = ends - flat_len
    col = np.arange(S)[None, :] * W + 2 + 2 * np.maximum(vcol, 0)
    vstart = np.take_along_axis(starts, col, axis=1)
    vend = np.take_along_axis(ends, col, axis=1)
    spans = np.full((D, A + 1, 2), -1, dtype=np.int32)
    ok = present & (vcol >= 0)
    spans[rows, attr_of, 0] = np.where(ok, vstart, -1)
    spans[rows, attr_of, 1] = np.where(ok, vend, -1)

    flat_ids = ids_.reshape(-1)
    keep = flat_ids != 0
    big = "".join(table_str[flat_ids[keep]].tolist())
    doc_end = np.cumsum(ends[:, -1]).tolist()
    doc_start = [0] + doc_end[:-1]
    texts = [big[a:b] for a, b in zip(doc_start, doc_end)]
    person = ids[pl].astype(np.int32)
    entry = np.tile(np.arange(E, dtype=np.int32), n)
    return Docs(texts, person, entry, spans[:, :A], table.attributes)


def render_world(world) -> Docs:
    """All bios of a world: each group with its augmentation (celebrity worlds have two)."""
    from factlab.world.people import CELEBRITY, MINORITY
    from factlab.world.sample import STREAM_RENDER, rng

    g = rng(world.config.seed, STREAM_RENDER)
    parts = []
    for grp, aug in ((CELEBRITY, world.config.augment), (MINORITY, world.config.minority_augment)):
        ids = np.flatnonzero(world.group == grp)
        if len(ids) == 0:
            continue
        if world.config.style == "bioR":
            from factlab.text.bior import render_bior

            parts.append(render_bior(world.people, ids, world.templates, aug, g, world.config.bior))
        else:
            parts.append(render_bios(world.people, ids, world.templates, aug, g))
    docs = Docs.concat(parts)
    return docs


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
