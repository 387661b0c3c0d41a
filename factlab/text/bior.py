"""bioR-like bios: a richer *template grammar* (not an LLM) as an offline stand-in for the
paper's Llama-written bioR.

Per entry: an optional opener; attributes grouped into sentence units (an adjacent pair
may share one sentence, e.g. "She studied Physics at Rice University."); units in a varied
order (a full shuffle with ``permute``); irrelevant filler sentences in between; the full
name at the first mention, later mentions by pronoun or a partial name ("Ms. Forger",
"Anya"). Everything is tracked so value spans stay exact.

:func:`rewrite_docs` plugs in any ``text -> text`` rewriter (e.g. a local LLM) and
re-locates the value spans in its output.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import resources

import numpy as np
import yaml

from factlab.text.augment import parse_augment
from factlab.text.documents import Docs
from factlab.text.templates import FORMS, PRONOUNS, TemplateSet, tokens

TITLES = {0: "Mr.", 1: "Ms.", 2: "Mx.", 3: "", -1: ""}
# adjacent pairs that may share a sentence, as attribute-name pairs
PAIRS = (("birth_date", "birth_city"), ("university", "major"), ("employer", "company_city"),
         ("birth_city", "university"), ("major", "employer"))


@lru_cache(maxsize=1)
def grammar() -> dict:
    text = resources.files("factlab.text").joinpath("data", "bior.yaml").read_text("utf-8")
    g = yaml.safe_load(text)
    pair_index: dict[frozenset, list[str]] = {}
    for tpl in g["pair"]:
        names = frozenset(t[1] for t in tokens(tpl) if t[0] == "ph" and t[1] not in
                          ("subj", "poss", "obj", "refl"))
        pair_index.setdefault(names, []).append(tpl)
    g["pair_index"] = pair_index
    return g


def _sentence(tpl: str, subj: str, plural: bool, pronoun: int, fullname: str | None,
              values: dict[str, str], spans: dict[str, tuple[int, int]], offset: int) -> str:
    """Render one template; record spans of the values it states (absolute offsets)."""
    if fullname is not None:  # fullname: no pronouns anywhere
        poss, obj, refl = fullname + "'s", fullname, fullname
    elif pronoun >= 0:
        _, poss, obj, refl, _ = FORMS[PRONOUNS[pronoun]]
    else:
        poss, obj, refl = subj + "'s", subj, subj
    out: list[str] = []
    n = 0
    for tok in tokens(tpl):
        if tok[0] == "lit":
            piece = tok[1]
        elif tok[0] == "agree":
            piece = tok[2] if plural else tok[1]
        else:
            key = tok[1]
            if key in ("subj", "name"):
                piece = subj
            elif key == "poss":
                piece = poss
            elif key == "obj":
                piece = obj
            elif key == "refl":
                piece = refl
            else:
                piece = values[key]
                spans[key] = (offset + n, offset + n + len(piece))
        out.append(piece)
        n += len(piece)
    s = "".join(out)
    return s[:1].upper() + s[1:] if s[:1].islower() else s


def render_bior(table, ids, templates: TemplateSet, augment: str, g: np.random.Generator,
                cfg) -> Docs:
    spec = parse_augment(augment)
    gram = grammar()
    attrs = table.attributes
    singles = {a: list(templates.sentences[a]) + list(gram["single"].get(a, [])) for a in attrs}
    texts, person, entry, all_spans = [], [], [], []
    for i in np.asarray(ids).tolist():
        name = table.names[i]
        parts = name.split()
        p = int(table.pronoun[i])
        values = {a: table.value(i, a) for a in attrs}
        values = {a: v for a, v in values.items() if v is not None}
        for e in range(spec.entries):
            texts_e, spans = _one_bio(name, parts, p, values, attrs, singles, gram, spec, g, cfg)
            texts.append(texts_e)
            person.append(i)
            entry.append(e)
            all_spans.append([spans.get(a, (-1, -1)) for a in attrs])
    return Docs(texts, np.array(person, np.int32), np.array(entry, np.int32),
                np.array(all_spans, np.int32).reshape(len(texts), len(attrs), 2), attrs)


def _one_bio(name, parts, p, values, attrs, singles, gram, spec, g, cfg):
    present = [a for a in attrs if a in values]
    units: list[tuple[str, ...]] = []
    k = 0
    while k < len(present):
        a = present[k]
        b = present[k + 1] if k + 1 < len(present) else None
        if b is not None and (a, b) in PAIRS and g.random() < cfg.pair_prob \
                and frozenset((a, b)) in gram["pair_index"]:
            units.append((a, b))
            k += 2
        else:
            units.append((a,))
            k += 1
    if spec.order == "permute":
        units = [units[j] for j in g.permutation(len(units))]
    else:  # varied but mostly canonical: swap neighbours now and then
        for j in range(len(units) - 1):
            if g.random() < 0.3:
                units[j], units[j + 1] = units[j + 1], units[j]
    seq: list = list(units)
    for _ in range(int(g.integers(0, cfg.max_fillers + 1))):
        seq.insert(int(g.integers(0, len(seq) + 1)), "filler")
    if g.random() < cfg.opener_prob:
        seq.insert(0, "opener")
    fullname = name if spec.fullname else None
    title = TITLES[p]
    out: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for j, unit in enumerate(seq):
        if j == 0 or spec.fullname or p < 0:
            subj, plural = name, False
        elif g.random() < cfg.partial_name_prob:
            use_title = title and g.random() < 0.5
            subj, plural = (f"{title} {parts[-1]}" if use_title else parts[0]), False
        else:
            subj, plural = FORMS[PRONOUNS[p]][0], FORMS[PRONOUNS[p]][4]
        if unit == "filler":
            tpl, vals = gram["filler"][int(g.integers(len(gram["filler"])))], {}
        elif unit == "opener":
            tpl, vals = gram["opener"][int(g.integers(len(gram["opener"])))], {}
        elif len(unit) == 1:
            a = unit[0]
            tpl, vals = singles[a][int(g.integers(len(singles[a])))], {"value": values[a]}
        else:
            opts = gram["pair_index"][frozenset(unit)]
            tpl, vals = opts[int(g.integers(len(opts)))], {a: values[a] for a in unit}
        if offset:
            offset += 1  # the joining space
        local: dict[str, tuple[int, int]] = {}
        s = _sentence(tpl, subj, plural, p, fullname, vals, local, offset)
        for key, span in local.items():
            spans[unit[0] if key == "value" else key] = span
        out.append(s)
        offset += len(s)
    return " ".join(out), spans


def rewrite_docs(docs: Docs, world, rewriter: Callable[[str], str]) -> tuple[Docs, int]:
    """Pass every text through ``rewriter`` and re-locate each value in the new text.

    Returns the new docs and how many attribute values the rewriter dropped (their spans
    become -1, so later metrics skip them instead of reading a wrong position).
    """
    attrs = docs.attributes
    texts, spans, lost = [], docs.spans.copy(), 0
    for d, (t, p) in enumerate(zip(docs.text, docs.person.tolist())):
        new = rewriter(t)
        if not isinstance(new, str):
            raise TypeError(f"rewriter returned {type(new).__name__}, expected str")
        for a in range(len(attrs)):
            if spans[d, a, 0] < 0:
                continue
            v = world.people.value(p, a)
            at = new.find(v)
            if at < 0:
                spans[d, a] = -1
                lost += 1
            else:
                spans[d, a] = (at, at + len(v))
        texts.append(new)
    return Docs(texts, docs.person.copy(), docs.entry.copy(), spans, attrs), lost
