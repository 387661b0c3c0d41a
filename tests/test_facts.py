"""User fact files: good files become worlds; each bad row is one error, nothing written."""

import json

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.world.facts import read_facts
from factlab.corpus import load_world, save_world

from conftest import make

ROWS = [
    ("Eiffel Tower", "height", "330 metres"), ("Eiffel Tower", "city", "Paris"),
    ("Golden Gate Bridge", "city", "San Francisco"), ("Golden Gate Bridge", "height", "227 metres"),
    ("Big Ben", "city", "London"), ("Colosseum", "city", "Rome"),
    ("Colosseum", "height", "48 metres"), ("Colosseum", "city", "Rome"),  # harmless repeat
]


def write_csv(path, rows, header="entity,attribute,value"):
    path.write_text(header + "\n" + "\n".join(",".join(f'"{x}"' for x in r) for r in rows) + "\n")
    return path


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(dict(zip(("entity", "attribute", "value"), r)))
                              for r in rows) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_fact_file_becomes_a_world(tmp_path, fmt):
    f = (write_csv if fmt == "csv" else write_jsonl)(tmp_path / f"f.{fmt}", ROWS)
    entities, attrs, facts = read_facts(f)
    assert entities == ["Eiffel Tower", "Golden Gate Bridge", "Big Ben", "Colosseum"]
    assert attrs == ["height", "city"] and len(facts) == 7
    w = make(facts=str(f), augment="multi2+permute", unknown=3)
    docs = w.bios()
    assert len(docs) == 8
    for d in range(len(docs)):
        p = int(docs.person[d])
        for a in range(2):
            v = w.people.value(p, a)
            s, e = docs.spans[d, a]
            if v is None:  # Big Ben has no height: no sentence, no span
                assert s == -1 and "height" not in docs.text[d]
            else:
                assert docs.text[d][s:e] == v
        assert w.people.names[p] in docs.text[d]
    qa = w.qa()
    assert len(qa) == 7 and "What is the height of Eiffel Tower?" in qa.question
    assert len(w.unknown) == 3 and not set(w.unknown.names) & set(entities)


def test_user_templates_are_used(tmp_path):
    f = write_csv(tmp_path / "f.csv", ROWS)
    tpl = tmp_path / "t.yaml"
    tpl.write_text("city:\n  sentences: ['{name} stands in {value}.']\n"
                   "  question: 'In which city is {name}?'\n"
                   "  paraphrases: ['Where is {name} located?']\n")
    w = make(facts=str(f), templates=str(tpl))
    t0 = w.bios().text[0]  # single: the name in the first sentence, "it" after it
    assert "Eiffel Tower stands in Paris." in t0 or t0.endswith(" It stands in Paris."), t0
    assert "In which city is Big Ben?" in w.qa().question
    tpl.write_text("colour:\n  sentences: ['{name} is {value}.']\n")
    with pytest.raises(FactlabError, match="unknown attribute 'colour'"):
        make(facts=str(f), templates=str(tpl))


@pytest.mark.parametrize("content,msg", [
    (b"entity,attribute\nA,b\n", r"f.csv:1: header lacks column 'value'"),
    (b"entity,attribute,value\nA,b,1\nB,b,\n", r"f.csv:3: empty value"),
    (b"entity,attribute,value\nA,b,1\nB,b,2\nA,b,3\n", r"f.csv:4: entity 'A' has two values for 'b': '1' \(line 2\) and '3'"),
    (b"entity,attribute,value\nA,b,1\nB,b,\xff\xfe\n", r"f.csv:3: not UTF-8"),
    (b"entity,attribute,value\nA,b,1\n", r"at least 2 entities"),
    (b"", r"empty file"),
])
def test_bad_csv(tmp_path, content, msg):
    f = tmp_path / "f.csv"
    f.write_bytes(content)
    with pytest.raises(FactlabError, match=msg):
        read_facts(f)


@pytest.mark.parametrize("lines,msg", [
    (['{"entity": "A", "attribute": "b"}'], r"f.jsonl:1: missing column 'value'"),
    (['{"entity": "A", "attribute": "b", "value": "1"}', '{"entity": "B", '], r"f.jsonl:2: not valid JSON"),
    (['{"entity": "A", "attribute": "b", "value": "  "}'], r"f.jsonl:1: empty value"),
    (['{"entity": "A", "attribute": "b", "value": null}'], r"f.jsonl:1: value must be text"),
    (['["A", "b", "c"]'], r"f.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl(tmp_path, lines, msg):
    f = tmp_path / "f.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(FactlabError, match=msg):
        read_facts(f)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FactlabError, match="no such file"):
        read_facts(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(FactlabError, match="unknown fact file type"):
        read_facts(tmp_path / "x.txt")


def test_fact_world_round_trips_through_disk(tmp_path):
    f = write_csv(tmp_path / "f.csv", ROWS)
    w = make(facts=str(f))
    save_world(w, tmp_path / "w")
    back = load_world(tmp_path / "w")
    assert back.people.names == w.people.names
    assert back.bios().text == w.bios().text
    assert (back.bios().spans == w.bios().spans).all()
    assert back.qa().question == w.qa().question and (back.split == w.split).all()
    assert np.array_equal(back.people.pronoun, w.people.pronoun)


AWKWARD = ["moons", "surveyed by", "born in", "home port", "CEO", "number_of_employees",
           "is member of", "located in", "founded", "Launch Year", "alias", "parents",
           "status", "has_part", "melting point", "genres", "was born in", "had owner",
           "x", "Main-Sponsor", "the_1st_ascent_by"]


@pytest.mark.parametrize("pronoun", [-1, 0, 2, 3])
def test_generic_templates_name_the_entity_once_and_state_the_value(pronoun):
    """Every generic sentence of every awkward attribute name, rendered for an entity
    referred to by name, by "he", "they" or "it", is one sentence that names the entity
    once (no "X has V as X's A") and states the value once; questions name it once."""
    from factlab.text.templates import (FULL, NAME, NAME_FIRST, NAME_POSS, PRON, VALUE,
                                        check_question, check_sentence, compile_sentence,
                                        generic_entry)

    name, value = "Dordorka-3", "Tenten Loquipel"
    for attr in AWKWARD:
        e = generic_entry(attr)
        for i, t in enumerate(e["sentences"]):
            check_sentence(t, attr)
            for kind in (NAME_FIRST, PRON, FULL):
                parts = compile_sentence(t, kind, pronoun)
                text = "".join(name if x == NAME else name + "'s" if x == NAME_POSS else
                               value if x == VALUE else x for x in parts)
                names = sum(x in (NAME, NAME_POSS) for x in parts)
                assert names == (1 if kind != PRON or pronoun < 0 else 0), (attr, text)
                assert text.count(value) == 1 and text.endswith(".") and text[0].isupper()
                assert "  " not in text and "'s " + attr not in text, (attr, text)
                for word in ("he", "she", "it", "they"):  # a pronoun is only a subject
                    assert f"of {word} " not in text and f"for {word}," not in text.lower()
        for q in [e["question"]] + e["paraphrases"]:
            check_question(q, attr)
            assert q.endswith("?") and q.count("{name}") == 1
    assert generic_entry("moons")["question"] == "What are the moons of {name}?"
    assert generic_entry("surveyed by")["sentences"][0] == "{subj} [was|were] surveyed by {value}."
    assert generic_entry("home port")["question"] == "What is the home port of {name}?"


def test_single_bios_of_a_fact_file_refer_by_pronoun_after_the_first_sentence(tmp_path):
    """``single`` is not ``fullname``: a fact file's entity is named once per bio, then "it"
    (or the pronoun its ``pronoun`` row gives); a bad pronoun is one clear error."""
    rows = [("Eiffel Tower", "height", "330 metres"), ("Eiffel Tower", "city", "Paris"),
            ("Eiffel Tower", "surveyed by", "Gustave Eiffel"),
            ("Marie Curie", "birth city", "Warsaw"), ("Marie Curie", "moons", "none"),
            ("Marie Curie", "pronoun", "she")]
    f = write_csv(tmp_path / "f.csv", rows)
    pron: dict = {}
    ents, attrs, facts = read_facts(f, pronouns=pron)
    assert pron == {"Marie Curie": "she"} and "pronoun" not in attrs and len(facts) == 5
    w = make(facts=str(f), augment="single", unknown=2)
    for d, text in enumerate(w.bios().text):
        name = w.people.names[int(w.bios().person[d])]
        assert text.count(name) == 1, text
        later = text.split(". ", 1)[1].lower().replace(",", " ").replace(".", " ").split()
        assert ("it" if name == "Eiffel Tower" else "she") in later, text
    assert "What was Eiffel Tower surveyed by?" in w.qa().question
    assert "What are the moons of Marie Curie?" in w.qa().question
    bad = write_csv(tmp_path / "b.csv", rows[:3] + [("Marie Curie", "pronoun", "xe"),
                                                    ("Marie Curie", "city", "Paris")])
    with pytest.raises(FactlabError, match=r"b.csv:5: pronoun 'xe' of 'Marie Curie'"):
        read_facts(bad)
