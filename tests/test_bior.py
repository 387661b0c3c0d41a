"""The bioR-like grammar and the rewriter hook."""

import re

import numpy as np

from factlab.text.bior import rewrite_docs

from conftest import make


def test_bior_spans_exact_and_grammar_is_rich():
    w = make(people=200, style="bioR", augment="multi2", they_fraction=0.2)
    docs = w.bios()
    assert len(docs) == 400
    partial = fillers_or_openers = pairs = 0
    for d in range(len(docs)):
        p = int(docs.person[d])
        text = docs.text[d]
        for a in range(6):
            s, e = docs.spans[d, a]
            assert text[s:e] == w.people.value(p, a)
        name = w.people.names[p]
        assert text.count(name) == 1  # full name once; later mentions pronoun / partial
        first, last = name.split()[0], name.split()[-1]
        rest = text.replace(name, "")
        partial += bool(re.search(rf"\b({first}|M[rsx]\.? {last})\b", rest))
        n_sent = len(re.findall(r"[.!?](\s|$)", text))
        fillers_or_openers += n_sent > 6
        pairs += n_sent < 6
    assert partial > 40 and fillers_or_openers > 100 and pairs > 40
    assert not any("{" in t or "[" in t for t in docs.text)
    assert not any(re.search(r"\bthey (was|has|is)\b", t, re.I) for t in docs.text)


def test_bior_order_varies_and_permute_shuffles():
    w = make(people=100, style="bioR", augment="single")
    wp = make(people=100, style="bioR", augment="single+permute1")
    def firsts(world):
        s = world.bios().spans
        return np.argmin(np.where(s[:, :, 0] < 0, 10**9, s[:, :, 0]), axis=1)
    assert (firsts(w) == 0).mean() > (firsts(wp) == 0).mean()
    assert len(set(firsts(wp).tolist())) == 6


def test_rewriter_hook_relocates_spans():
    w = make(people=20, style="bioR")
    docs = w.bios()
    new, lost = rewrite_docs(docs, w, lambda t: "Profile. " + t)
    assert lost == 0 and (new.spans == docs.spans + 9).all()
    for d in range(len(new)):
        for a in range(6):
            s, e = new.spans[d, a]
            assert new.text[d][s:e] == w.people.value(int(new.person[d]), a)
    dropped, lost = rewrite_docs(docs, w, lambda t: t.replace(w.people.value(0, "major"), "it"))
    assert lost >= 1 and (dropped.spans[dropped.person == 0, 3] == -1).all()
