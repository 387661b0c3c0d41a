"""World directories (determinism, atomicity, loading) and the CLI."""

import json

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.io import sha256_file
from factlab.world.people import MINORITY
from factlab.corpus.store import FILES, load_world, save_world

from conftest import cli, make




def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        save_world(make(people=120, seed=seed, augment="multi2+permute"), tmp_path / name)
    for f in FILES + ("manifest.json",):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert sha256_file(tmp_path / "a/bios.jsonl") != sha256_file(tmp_path / "c/bios.jsonl")
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    assert m["seed"] == 4 and m["counts"]["bios"] == 240 and m["counts"]["qa"] == 720
    assert m["files"]["bios.jsonl"] == sha256_file(tmp_path / "a/bios.jsonl")


def test_load_round_trip_and_tamper_detection(tmp_path):
    w = make(people=80, augment="single+permute2", they_fraction=0.5)
    save_world(w, tmp_path / "w")
    back = load_world(tmp_path / "w")
    assert back.people.names == w.people.names and (back.split == w.split).all()
    assert back.bios().text == w.bios().text and (back.bios().spans == w.bios().spans).all()
    assert back.people.column("employer") == w.people.column("employer")
    assert np.array_equal(back.people.pronoun, w.people.pronoun)
    assert back.unknown.names == w.unknown.names
    with open(tmp_path / "w/bios.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(FactlabError, match="does not match the manifest"):
        load_world(tmp_path / "w")


def test_jsonl_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    save_world(make(people=30), tmp_path / "w")
    for f in ("people", "unknown_people", "bios", "qa", "qa_paraphrase"):
        ds = datasets.load_dataset("json", data_files=str(tmp_path / f"w/{f}.jsonl"),
                                   split="train", cache_dir=str(tmp_path / "cache"))
        assert len(ds) > 0
    bios = datasets.load_dataset("json", data_files=str(tmp_path / "w/bios.jsonl"),
                                 split="train", cache_dir=str(tmp_path / "cache"))
    r = bios[0]
    s, e = r["spans"]["university"]
    assert r["text"][s:e] and len(bios) == 30


def test_existing_directory_needs_force(tmp_path):
    save_world(make(people=20), tmp_path / "w")
    before = (tmp_path / "w/bios.jsonl").read_bytes()
    with pytest.raises(FactlabError, match="already exists"):
        save_world(make(people=20, seed=9), tmp_path / "w")
    assert (tmp_path / "w/bios.jsonl").read_bytes() == before
    save_world(make(people=20, seed=9), tmp_path / "w", force=True)
    assert (tmp_path / "w/bios.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp dirs left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import factlab.corpus.store as store

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(store, "sha256_file", boom)
    with pytest.raises(RuntimeError):
        save_world(make(people=20), tmp_path / "w")
    assert list(tmp_path.iterdir()) == []


def test_celebrity_world():
    w = make(people=50, minority=40, augment="multi5+permute", minority_augment="single+permute1")
    minority = w.group == MINORITY
    assert minority.sum() == 40
    assert (w.split[minority] == 1).all() and (w.split[~minority] == 0).all()
    docs = w.bios()
    per = np.bincount(docs.person, minlength=90)
    assert (per[~minority] == 5).all() and (per[minority] == 1).all()
    assert set(w.train_ids.tolist()).isdisjoint(w.test_ids.tolist())


def test_cli_make_show_validate(tmp_path, capsys):
    out = tmp_path / "w"
    assert cli("world", "make", out, "--people", 40, "--augment", "multi5+permute",
               "--seed", 2, "--set", "pools.cities=20") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["pools"]["cities"] == 20 and m["counts"]["bios"] == 200
    cities = {json.loads(l)["birth_city"] for l in open(out / "people.jsonl")}
    assert len(cities) <= 20
    assert cli("world", "show", out) == 0
    shown = capsys.readouterr().out
    assert "bios" in shown and "200" in shown and "birth_city" in shown
    f = tmp_path / "f.csv"
    f.write_text("entity,attribute,value\nA,color,red\nB,color,blue\n")
    assert cli("world", "validate", f) == 0
    assert "2 entities" in " ".join(capsys.readouterr().out.split())  # rich may wrap


@pytest.mark.parametrize("args,msg", [
    (["world", "make", "{out}", "--people", 10, "--augment", "multi"], "augment 'multi'"),
    (["world", "make", "{out}", "--set", "pools.nope=3"], "unknown key 'pools.nope'"),
    (["world", "make", "{out}", "--people", 10**9], "unique full names"),
    (["world", "make", "{out}", "--facts", "{bad}"], "bad.csv:3: empty value"),
    (["world", "validate", "{bad}"], "bad.csv:3: empty value"),
    (["world", "show", "{out}"], "no such world directory"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, msg):
    bad = tmp_path / "bad.csv"
    bad.write_text("entity,attribute,value\nA,x,1\nB,x,\n")
    out = tmp_path / "out"
    args = [str(a).format(out=out, bad=bad) for a in args]
    assert cli(*args) == 2
    e = capsys.readouterr().err.strip()
    assert e.startswith("error:") and msg in e and len(e.splitlines()) == 1, e
    assert not out.exists()


def test_fast_line_encoders_match_json_dumps(world_small):
    from factlab.io import dumps

    docs = world_small.bios()
    names = world_small.people.names
    assert list(docs.jsonl(names)) == [dumps(r) for r in docs.records(names)]
    qa = world_small.qa(paraphrase=True)
    assert list(qa.jsonl(world_small.split, names)) == \
        [dumps(r) for r in qa.records(world_small.split, names)]
    # quotes, backslashes and non-ASCII survive the fast path too
    from factlab.text.documents import Docs
    import numpy as np
    odd = Docs(['He said "hi" \\ café'], np.zeros(1, np.int32), np.zeros(1, np.int32),
               np.array([[[0, 2]]], np.int32), ("x",))
    assert list(odd.jsonl(['Zoë "Z"'])) == [dumps(r) for r in odd.records(['Zoë "Z"'])]
