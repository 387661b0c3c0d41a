"""Pure-data worlds: no text imports, cohorts, versioned facts, and codes that survive a
round trip through the world directory (format 2)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from factlab.corpus import CorpusConfig, load_world, make_corpus, save_experiences, save_world
from factlab.corpus.config import CorpusConfig as CC
from factlab.corpus.store import FILES
from factlab.errors import FactlabError
from factlab.io import sha256_file
from factlab.text.config import RenderConfig
from factlab.world import WorldConfig, add_cohort, update_facts
from factlab.world.people import TEST, TRAIN

EMP, CITY = 4, 5  # employer, company_city


def corpus(**kw):
    kw.setdefault("seed", 3)
    kw.setdefault("unknown", 8)
    kw.setdefault("pools", {"companies": 60})
    return make_corpus(CorpusConfig(**kw))


def test_world_modules_never_import_text():
    code = ("import pkgutil, importlib, sys, factlab.world as w\n"
            "mods = [m.name for m in pkgutil.walk_packages(w.__path__, 'factlab.world.')]\n"
            "for m in mods: importlib.import_module(m)\n"
            "assert len(mods) >= 7, mods\n"
            "bad = [m for m in sys.modules if m.startswith(('factlab.text', 'factlab.corpus', 'torch'))]\n"
            "assert not bad, bad\n"
            "from factlab.world import WorldConfig, make_world, add_cohort, update_facts\n"
            "w = update_facts(add_cohort(make_world(WorldConfig(people=20, unknown=3)), 4, 1, 0),"
            " [0, 1], 'employer', 2, 0)\n"
            "assert not [m for m in sys.modules if m.startswith('factlab.text')]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_corpus_config_is_exactly_world_plus_render():
    w, r, c = WorldConfig.model_fields, RenderConfig.model_fields, CC.model_fields
    assert set(c) == set(w) | set(r) and not set(w) & set(r)
    for k, f in c.items():
        src = w.get(k) or r[k]
        assert f.default == src.default and f.metadata == src.metadata, k
    cfg = CC(people=50, augment="multi2", style="bioR", pools={"cities": 7})
    assert cfg.world_config().pools.cities == 7 and cfg.render_config().augment == "multi2"
    assert CC.join(cfg.world_config(), cfg.render_config()) == cfg
    with pytest.raises(Exception):
        CC(people=1)


def test_cohort_keeps_everything_before_and_draws_fresh_names():
    c = corpus(people=40)
    w = c.world
    w1 = add_cohort(w, 10, 1, seed=5)
    n = len(w.people)
    assert len(w1.people) == n + 10 and len(w.people) == n  # the input is untouched
    assert w1.people.names[:n] == w.people.names
    assert np.array_equal(w1.people.codes[:n], w.people.codes)
    assert np.array_equal(w1.split[:n], w.split) and np.array_equal(w1.unknown.codes, w.unknown.codes)
    assert w1.arrival.tolist() == [0] * n + [1] * 10
    new = w1.people.names[n:]
    assert len(set(new)) == 10 and not set(new) & (set(w.people.names) | set(w.unknown.names))
    assert set(w1.split[n:].tolist()) == {TRAIN, TEST}
    codes = w1.people.codes[n:]
    assert (codes >= 0).all() and all((codes[:, a] < len(p)).all()
                                      for a, p in enumerate(w1.people.pools))
    hq = w.derived[0].codes
    assert np.array_equal(codes[:, CITY], hq[codes[:, EMP]])  # the city follows the employer
    # base ids and splits are the base world's; cohort ids are asked for by arrival
    assert np.array_equal(w1.train_ids, w.train_ids) and len(w1.ids(arrival=1)) == 10
    again = add_cohort(w, 10, 1, seed=5)
    other = add_cohort(w, 10, 1, seed=6)
    assert again.people.names == w1.people.names and np.array_equal(again.people.codes,
                                                                    w1.people.codes)
    assert other.people.names[n:] != new
    with pytest.raises(FactlabError, match="already has a cohort"):
        add_cohort(w1, 3, 1, seed=0)
    w3 = add_cohort(w1, 3, 3, seed=0)
    with pytest.raises(FactlabError, match="in order"):
        add_cohort(w3, 3, 2, seed=0)


def test_cohort_names_avoid_every_taken_name_until_none_is_left():
    # 2 x 2 x 3 = 12 possible names: 6 people + 2 unknown leave exactly 4
    c = corpus(people=6, unknown=2, pools={"first": 2, "middle": 2, "last": 3})
    w = add_cohort(c.world, 4, 1, seed=0)
    assert len(set(w.people.names) | set(w.unknown.names)) == 12
    with pytest.raises(FactlabError, match="unique full names"):
        add_cohort(c.world, 5, 1, seed=0)


def test_update_changes_value_from_its_experience_and_city_follows_employer():
    c = corpus(people=300)
    w = c.world
    ids = w.train_ids[:120]
    w2 = update_facts(w, ids, "employer", 2, seed=1)
    before, after = w2.codes_at(1), w2.codes_at(2)
    assert np.array_equal(before, w.people.codes) and np.array_equal(w2.codes_at(0), before)
    assert (after[ids, EMP] != before[ids, EMP]).all()
    others = np.setdiff1d(np.arange(len(w.people)), ids)
    assert np.array_equal(after[others], before[others])
    hq = w.derived[0].codes
    assert np.array_equal(after[:, CITY], hq[after[:, EMP]])
    up = w2.updates.of(2)
    moved = up.person[up.attribute == CITY]
    really = ids[hq[after[ids, EMP]] != hq[before[ids, EMP]]]
    assert np.array_equal(np.sort(moved), np.sort(really))  # counted only where it changed
    assert 0 < len(really) < len(ids)  # both cases occur in this world
    assert np.array_equal(up.previous[up.attribute == EMP], before[ids, EMP])
    i = int(ids[0])
    assert w2.value(i, "employer", at=1) == w.people.value(i, "employer")
    assert w2.value(i, "employer", at=2) == w2.people.pools[EMP][after[i, EMP]]
    assert update_facts(w, ids, "employer", 2, seed=1).updates.code.tolist() == up.code.tolist()
    with pytest.raises(FactlabError, match="follows employer"):
        update_facts(w, ids, "company_city", 2, seed=1)
    with pytest.raises(FactlabError, match="already updated"):
        update_facts(w2, ids[:3], "employer", 2, seed=2)
    # a later update of the same fact overrides the earlier one from its experience on
    w3 = update_facts(w2, ids[:5], "employer", 3, seed=2)
    assert np.array_equal(w3.codes_at(2), after)
    assert (w3.codes_at(3)[ids[:5], EMP] != after[ids[:5], EMP]).all()


def test_updates_need_people_who_arrived_before():
    w = add_cohort(corpus(people=20).world, 6, 1, seed=0)
    late = w.ids(arrival=1)
    with pytest.raises(FactlabError, match="arrives in experience 1"):
        update_facts(w, late, "major", 1, seed=0)
    w2 = update_facts(w, late, "major", 2, seed=0)
    assert (w2.codes_at(2)[late, 3] != w.people.codes[late, 3]).all()


def test_texts_of_experiences():
    c = corpus(people=30, augment="multi2+permute")
    base_bios = c.bios().text
    base_para = c.qa(paraphrase=True)
    c2 = c.add_cohort(8, 1, seed=0).update_facts([0, 1, 2], "university", 2, seed=0)
    assert c2.bios().text == base_bios  # the base text never changes
    assert c2.qa(paraphrase=True).question == base_para.question
    cb = c2.cohort_bios(1)
    cohort = c2.ids(arrival=1)
    assert sorted(set(cb.person.tolist())) == cohort.tolist() and len(cb) == 16
    for d in range(len(cb)):
        p = int(cb.person[d])
        for a in range(6):
            s, e = cb.spans[d, a]
            assert cb.text[d][s:e] == c2.value(p, a, at=1)
    ub = c2.update_bios(2)
    assert sorted(set(ub.person.tolist())) == [0, 1, 2]
    for d in range(len(ub)):
        s, e = ub.spans[d, 2]
        assert ub.text[d][s:e] == c2.value(int(ub.person[d]), "university", at=2)
    q1, q2 = c2.qa([0], at=1), c2.qa([0], at=2)
    assert q1.question == q2.question and q1.answer[2] != q2.answer[2]
    assert q1.answer[:2] == q2.answer[:2]
    p2 = c2.qa([0], at=2, paraphrase=True)
    assert p2.question == c.qa([0], paraphrase=True).question and \
        p2.answer[2] == q2.answer[2]


def _codes_equal(a, b):
    assert a.people.names == b.people.names and a.unknown.names == b.unknown.names
    assert np.array_equal(a.people.codes, b.people.codes)
    assert np.array_equal(a.unknown.codes, b.unknown.codes)
    assert [list(p) for p in a.people.pools] == [list(p) for p in b.people.pools]
    assert np.array_equal(a.arrival, b.arrival) and np.array_equal(a.split, b.split)
    for f in ("person", "attribute", "experience", "code", "previous"):
        assert np.array_equal(getattr(a.updates, f), getattr(b.updates, f)), f
    for t in range(a.world.last_experience + 1):
        assert np.array_equal(a.codes_at(t), b.codes_at(t))


def test_loaded_world_keeps_codes_people_unknown_cohorts_updates(tmp_path):
    c = corpus(people=50, they_fraction=0.3)
    c = c.add_cohort(6, 1, seed=2).update_facts(c.train_ids[:10], "employer", 2, seed=2)
    save_world(c, tmp_path / "w")
    back = load_world(tmp_path / "w")
    _codes_equal(back, c)
    assert back.cohort_bios(1).text == c.cohort_bios(1).text
    assert back.update_bios(2).text == c.update_bios(2).text
    # new cohorts drawn from a loaded world are the fresh world's, code for code
    _codes_equal(back.add_cohort(5, 3, seed=9), c.add_cohort(5, 3, seed=9))
    m = json.loads((tmp_path / "w/manifest.json").read_text())
    assert m["format"] == 2 and [e["experience"] for e in m["experiences"]] == [1, 2]
    assert "experiences/2/updates.jsonl" in m["files"]
    ups = [json.loads(x) for x in (tmp_path / "w/experiences/2/updates.jsonl").read_text().split("\n") if x]
    assert all(u["old"] != u["new"] for u in ups) and len(ups) == len(c.updates)


def test_fact_file_world_codes_survive_loading(tmp_path):
    rows = [{"entity": f"Item {i}", "attribute": "colour", "value": f"c{i % 4}"} for i in range(12)]
    rows += [{"entity": f"Item {i}", "attribute": "maker", "value": f"m{(i * 7) % 5}"}
             for i in range(0, 12, 2)]
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = corpus(facts=str(path), unknown=9, seed=4, pools={})
    c = c.add_cohort(4, 1, seed=0).update_facts([0, 1], "colour", 1, seed=0)
    save_world(c, tmp_path / "w")
    _codes_equal(load_world(tmp_path / "w"), c)


def test_experiences_extend_a_directory_without_touching_its_bytes(tmp_path):
    c = corpus(people=40)
    save_world(c, tmp_path / "w")
    before = {f: (tmp_path / "w" / f).read_bytes() for f in FILES}
    c1 = c.add_cohort(6, 1, seed=0)
    save_experiences(c1, tmp_path / "w")
    c2 = c1.update_facts([3, 4, 41], "major", 2, seed=0)
    m = save_experiences(c2, tmp_path / "w")
    assert {f: (tmp_path / "w" / f).read_bytes() for f in FILES} == before
    assert all(sha256_file(tmp_path / "w" / f) == h for f, h in m["files"].items())
    # the same corpus written in one go gives the same files, byte for byte
    save_world(c2, tmp_path / "once")
    for f in m["files"]:
        assert (tmp_path / "w" / f).read_bytes() == (tmp_path / "once" / f).read_bytes(), f
    _codes_equal(load_world(tmp_path / "w"), c2)
    with pytest.raises(FactlabError, match="another world"):
        save_experiences(corpus(people=40, seed=4).add_cohort(3, 1, seed=0), tmp_path / "w")
    with pytest.raises(FactlabError, match="lacks"):
        save_experiences(c, tmp_path / "w")
    (tmp_path / "w/experiences/2/update_bios.jsonl").write_text("")
    with pytest.raises(FactlabError, match="does not match"):
        load_world(tmp_path / "w")


def test_format_1_directory_is_refused_with_what_to_do(tmp_path):
    save_world(corpus(people=20), tmp_path / "old")
    mf = tmp_path / "old/manifest.json"
    m = json.loads(mf.read_text())
    m["format"] = 1
    mf.write_text(json.dumps(m))
    with pytest.raises(FactlabError, match=r"old: world format 1.*factlab world make"):
        load_world(tmp_path / "old")
    m["format"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(FactlabError, match="upgrade factlab"):
        load_world(tmp_path / "old")


def test_cli_makes_the_same_world_and_shows_experiences(tmp_path, capsys):
    from conftest import cli

    assert cli("world", "make", tmp_path / "w", "--people", 30, "--augment", "multi2",
               "--seed", 3, "--unknown", 8, "--set", "pools.companies=60") == 0
    c = corpus(people=30, augment="multi2")
    save_world(c, tmp_path / "py")
    for f in FILES:
        assert (tmp_path / "w" / f).read_bytes() == (tmp_path / "py" / f).read_bytes(), f
    save_experiences(c.add_cohort(4, 1, seed=0), tmp_path / "w")
    capsys.readouterr()
    assert cli("world", "show", tmp_path / "w") == 0
    assert "experience 1" in capsys.readouterr().out
