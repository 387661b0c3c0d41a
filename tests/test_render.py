"""Templates and the bioS renderer: placeholders, agreement, augmentation semantics, spans."""

import re

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.text.augment import NAMED, parse_augment
from factlab.text.documents import compiled_for, draw_layout, render_bios, render_bios_reference
from factlab.text.templates import (FULL, NAME_FIRST, PRON, bios_templates, check_sentence,
                                    compile_sentence)
from factlab.world.people import ATTRIBUTES

from conftest import make

PRONOUN_WORDS = re.compile(r"\b(he|she|they|his|her|hers|their|him|them|himself|herself|"
                           r"themselves)\b", re.I)
BAD_AGREEMENT = [re.compile(p, re.I) for p in (
    r"\bthey (was|has|is|does|goes|works)\b", r"\b(he|she) (were|have|are|do)\b")]


def fill(parts, name, value):
    return "".join(p if isinstance(p, str) else (value if p == 3 else
                   name + "'s" if p == 2 else name) for p in parts)


def test_shipped_template_counts():
    t = bios_templates()
    for a in ATTRIBUTES:
        assert 45 <= len(t.sentences[a]) <= 55, a
        assert len(set(t.sentences[a])) == len(t.sentences[a])
        assert len(t.paraphrases[a]) >= 3 and t.question[a] not in t.paraphrases[a]


def test_every_template_renders_every_value_with_agreement(world_small):
    """All templates x all modes x (a spread of) every attribute's values."""
    t = bios_templates()
    tab = world_small.people
    for a, attr in enumerate(ATTRIBUTES):
        pool = tab.pools[a]
        values = pool if len(pool) <= 400 else pool[:: max(1, len(pool) // 400)]
        for tpl in t.sentences[attr]:
            for kind in (PRON, NAME_FIRST, FULL):
                for p in (0, 1, 2):
                    parts = compile_sentence(tpl, kind, p)
                    for v in values[:: 7] + values[:3]:
                        s = fill(parts, "Anya Briar Forger", v)
                        assert not re.search(r"[{}\[\]]", s), s
                        assert s[0].isupper() and s.endswith("."), s
                        assert s.count(v) >= 1
                        if kind == PRON:
                            for bad in BAD_AGREEMENT:
                                assert not bad.search(s), s
                        if kind == FULL:
                            assert not PRONOUN_WORDS.search(s.replace(v, "")), s
                    if kind == PRON:
                        subj = ("He", "She", "They")[p]
                        assert fill(parts, "X", "V").startswith(subj + " "), tpl


def test_agreement_check_catches_a_bad_template():
    s = fill(compile_sentence("{subj} was born on {value}.", PRON, 2), "N", "May 1, 1990")
    assert any(b.search(s) for b in BAD_AGREEMENT)


@pytest.mark.parametrize("bad,msg", [
    ("{subj} was born.", "exactly one {value}"),
    ("He was born on {value}.", r"exactly one \{subj\}"),
    ("{subj} was born on {value} in {city}.", "unknown placeholder"),
    ("{subj} [was|were born on {value}.", "stray"),
])
def test_bad_templates_are_rejected(bad, msg):
    with pytest.raises(FactlabError, match=msg):
        check_sentence(bad, "tpl")


@pytest.mark.parametrize("name", NAMED)
def test_fast_renderer_equals_plain_reference(world_small, name):
    ids = np.arange(60)
    fast = render_bios(world_small.people, ids, world_small.templates, name,
                       np.random.default_rng(7))
    ref = render_bios_reference(world_small.people, ids, world_small.templates, name,
                                np.random.default_rng(7))
    assert fast.text == ref.text
    assert (fast.spans == ref.spans).all() and (fast.person == ref.person).all()


@pytest.mark.parametrize("name", NAMED)
def test_spans_point_at_the_values(world_small, name):
    t = world_small.people
    docs = render_bios(t, np.arange(len(t)), world_small.templates, name,
                       np.random.default_rng(1))
    spec = parse_augment(name)
    assert len(docs) == len(t) * spec.entries
    for d in range(len(docs)):
        p = int(docs.person[d])
        for a in range(6):
            s, e = docs.spans[d, a]
            assert docs.text[d][s:e] == t.value(p, a)
        name_ = t.names[p]
        if spec.fullname:
            assert docs.text[d].count(name_) >= 6
            assert not PRONOUN_WORDS.search(docs.text[d])
        else:
            assert docs.text[d].count(name_) == 1  # the full name in one sentence only
            if spec.reverse:
                assert docs.text[d].index(name_) > docs.spans[d, :, 1].max()
            else:
                assert docs.text[d].startswith(name_)


def _layout(name, n=50):
    comp = compiled_for(bios_templates())
    return draw_layout(parse_augment(name), n, 6, comp, np.random.default_rng(0))


def test_single_permute_shuffles_the_same_sentences():
    tmpl, order, _ = _layout("single+permute5")
    tmpl, order = tmpl.reshape(50, 5, 6), order.reshape(50, 5, 6)
    assert (tmpl == tmpl[:, :1]).all()  # same template per attribute in all 5 entries
    assert (np.sort(order, axis=2) == np.arange(6)).all()  # each entry: all six facts
    assert (order != order[:, :1]).any(axis=(1, 2)).mean() > 0.9  # orders differ


def test_multi_redraws_templates_and_keeps_order():
    tmpl, order, _ = _layout("multi5")
    tmpl = tmpl.reshape(50, 5, 6)
    assert (order == np.arange(6)).all()
    assert (tmpl != tmpl[:, :1]).any(axis=(1, 2)).all()  # entries differ in templates


def test_multi_entries_differ_in_text_but_state_the_same_facts(world_small):
    t = world_small.people
    docs = render_bios(t, np.arange(20), world_small.templates, "multi5",
                       np.random.default_rng(0))
    for p in range(20):
        texts = [docs.text[d] for d in range(len(docs)) if docs.person[d] == p]
        assert len(set(texts)) == 5
        for d in np.flatnonzero(docs.person == p):
            got = [docs.text[d][s:e] for s, e in docs.spans[d]]
            assert got == [t.value(p, a) for a in range(6)]


def test_couple_keeps_pairs_adjacent(world_small):
    docs = render_bios(world_small.people, np.arange(100), world_small.templates, "couple2",
                       np.random.default_rng(0))
    assert len(docs) == 200
    pairs_first = set()
    for d in range(len(docs)):
        rank = np.argsort(np.argsort(docs.spans[d, :, 0]))  # order of appearance
        for a in (0, 2, 4):
            assert rank[a + 1] == rank[a] + 1  # date->city, university->major, employer->city
        pairs_first.add(int(np.argmin(docs.spans[d, :, 0])))
    assert pairs_first == {0, 2, 4}  # pair order really varies


def test_bad_augment_names():
    for bad, msg in [("multi", "needs a number"), ("single+shuffle", "unknown part"),
                     ("multi5+permute3", "plain 'permute'"), ("single+fullname+reverse",
                                                              "contradict"),
                     ("permute+couple", "cannot be combined")]:
        with pytest.raises(FactlabError, match=msg):
            parse_augment(bad)
    assert parse_augment("multi5+permute").name == "multi5+permute"
    assert parse_augment("couple5").entries == 5


def test_world_bios_use_the_config_augmentation():
    w = make(people=40, augment="multi2+permute")
    assert len(w.bios()) == 80
