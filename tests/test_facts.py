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
    assert "Eiffel Tower stands in Paris." in w.bios().text[0]
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
