"""The bio reader recovers every fact of real rendered bios."""

import pytest

from conftest import make
from factlab.text.parse import BioParser


@pytest.fixture(scope="module")
def parser():
    # compiling every template x mode takes seconds: one parser for the module (the worlds
    # below share the shipped templates and pools)
    w = make(people=10, seed=5)
    return BioParser(w.templates, w.world.people.pools)


@pytest.mark.parametrize("augment,they", [("multi3+permute", 0.3), ("single+fullname", 0.0),
                                          ("multi2", 0.5)])
def test_parser_recovers_every_fact_of_real_bios(parser, augment, they):
    w = make(people=40, augment=augment, seed=5, they_fraction=they)
    assert parser.pools == {a: set(p) for a, p in zip(w.attributes, w.world.people.pools)}
    docs = w.bios()
    names = w.people.names
    for text, p in zip(docs.text, docs.person.tolist()):
        facts, unread = parser.parse(text)
        assert unread == 0, text
        got = {(f.name, f.attribute, f.value) for f in facts}
        want = {(names[p], a, w.value(p, a)) for a in w.attributes}
        assert got == want, text
        assert all(f.in_pool for f in facts)


def test_parser_reads_made_up_text(parser):
    facts, unread = parser.parse("Zed Quux Blorp was born on March 3, 1950. He worked for "
                                 "Nonexistent Widgets Inc. The moon is made of cheese. She "
                                 "studied nothing at all")
    assert facts[0].name == "Zed Quux Blorp" and facts[0].attribute == "birth_date"
    assert facts[0].value == "March 3, 1950"
    assert any(f.attribute == "employer" and f.value == "Nonexistent Widgets Inc" and
               not f.in_pool for f in facts)
    assert unread >= 1


@pytest.mark.parametrize("augment", ["single", "multi2+permute"])
def test_parser_recovers_every_fact_of_a_fact_file_world(augment):
    """Generic templates, and "it" after the first sentence, read back exactly."""
    from pathlib import Path

    ships = Path(__file__).resolve().parents[1] / "examples" / "ships.csv"
    w = make(facts=str(ships), augment=augment, unknown=2)
    parser = BioParser(w.templates, w.world.people.pools)
    names = w.people.names
    for text, p in zip(w.bios().text, w.bios().person.tolist()):
        facts, unread = parser.parse(text)
        assert unread == 0, text
        assert {(f.name, f.attribute, f.value) for f in facts} == {
            (names[p], a, w.value(p, a)) for a in w.attributes if w.value(p, a)}, text
