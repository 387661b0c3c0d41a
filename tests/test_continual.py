"""Continual knowledge learning: streams, their test facts, the methods' plugins, and a
stream run on a tiny base that knows its world."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import cli, make
from factlab.continual.data import FactStream, experience_data
from factlab.continual.methods import (EWC, LwF, Replay, diagonal_fisher, distillation_kl,
                                       reservoir)
from factlab.corpus import load_world, save_world
from factlab.corpus.stream import (StreamConfig, counts, kinds_of, load_stream, make_stream,
                                   save_stream, stream_facts)
from factlab.errors import FactlabError

SMALL_POOLS = {"cities": 12, "universities": 12, "majors": 12, "companies": 12}


def base_world(**kw):
    kw.setdefault("pools", SMALL_POOLS)
    return make(people=kw.pop("people", 24), augment=kw.pop("augment", "multi2"), **kw)


# ------------------------------------------------------------------------ streams
def test_stream_invariants(tmp_path):
    base = base_world(seed=3)
    cfg = StreamConfig(cohorts=2, people=6, updates=0.25, seed=1)
    s = make_stream(base, cfg)
    w = s.world
    T = w.last_experience
    assert T == 3 and s.experiences == [1, 2, 3]
    # new people are never base or unknown people
    new = w.ids()[w.arrival > 0]
    assert len(new) == 12
    taken = set(w.people.names[i] for i in w.base_ids) | set(w.unknown.names)
    assert not taken & {w.people.names[i] for i in new}
    # invariant facts unchanged; updated facts differ and stale is the old value
    facts = stream_facts(s)
    u = w.updates.of(3)
    assert len(u) >= 6  # 25% of 24 people, employer plus the company cities that move
    for r in facts.records():
        if r["label"] == "updated":
            a = w.attributes.index(r["attribute"])
            assert r["answer"] == w.value(r["person"], a, at=3) != r["stale"] == \
                w.value(r["person"], a, at=0)
        elif r["label"] == "invariant":
            assert r["answer"] == base.value(r["person"], r["attribute"])
        elif r["label"] == "new":
            assert w.arrival[r["person"]] == r["experience"] > 0
    assert {"invariant", "updated", "new", "unknown"} == set(facts.label)
    c = counts(s, facts)
    assert [e["kind"] for e in c["experiences"]] == ["base", "cohort", "cohort", "update"]
    assert c["experiences"][3]["updated"] == int((facts.label == "updated").sum())
    # the base world's files are byte for byte those of the base world alone
    save_world(base, tmp_path / "base")
    save_stream(s, tmp_path / "s1", cfg=cfg)
    for f in ("people.jsonl", "bios.jsonl", "qa.jsonl", "pools.json"):
        assert (tmp_path / "base" / f).read_bytes() == (tmp_path / "s1" / f).read_bytes()
    # same seed and config: the same stream, byte for byte
    save_stream(make_stream(base_world(seed=3), cfg), tmp_path / "s2", cfg=cfg)
    m1 = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert m1["files"] == m2["files"]
    loaded, meta = load_stream(tmp_path / "s1")
    assert meta["experiences"][2] == {"t": 3, "kind": "update"}
    assert [r["answer"] for r in stream_facts(loaded).records()] == \
        [r["answer"] for r in facts.records()]


def test_stream_bad_input(tmp_path):
    base = base_world(seed=3)
    for kw, msg in [({"updates": 0.0, "order": ["update"]}, "in \\(0, 1\\]"),
                    ({"updates": 1.5}, "in \\(0, 1\\]"),
                    ({"attribute": "shoe_size"}, "shoe_size"),
                    ({"cohorts": 0, "updates": 0}, "no experiences"),
                    ({"people": 1}, ">= 2")]:
        with pytest.raises(FactlabError, match=msg):
            make_stream(base, StreamConfig(**kw))
    # a cohort that cannot get names no base or unknown person has
    tiny = make(people=6, unknown=2, pools={"first": 2, "middle": 2, "last": 2})
    with pytest.raises(FactlabError, match="unique full names"):
        make_stream(tiny, StreamConfig(cohorts=1, people=5, updates=0))
    with pytest.raises(FactlabError, match="lambda"):
        EWC(lam=-1.0)
    with pytest.raises(FactlabError, match="not a stream"):
        load_stream(tmp_path)


def test_stream_cli(tmp_path, capsys):
    save_world(base_world(seed=3), tmp_path / "w")
    out = tmp_path / "s"
    assert cli("stream", "make", out, "--world", tmp_path / "w", "--cohorts", 2, "--people", 6,
               "--updates", 0.25) == 0
    assert (out / "stream.json").is_file()
    capsys.readouterr()
    assert cli("stream", "show", out) == 0
    shown = capsys.readouterr().out
    assert "update" in shown and "cohort" in shown
    # bad input: one error, exit 2, nothing written
    assert cli("stream", "make", tmp_path / "bad", "--world", tmp_path / "w", "--updates",
               2.0) == 2
    assert not (tmp_path / "bad").exists()
    assert cli("stream", "make", out, "--world", tmp_path / "w") == 2  # exists, no --force


# ------------------------------------------------------------------- the plugins
def test_reservoir_is_uniform():
    # every item of a stream of N is kept with probability k / N: chi-square over many runs
    N, k, runs = 20, 5, 4000
    hits = np.zeros(N)
    for r in range(runs):
        g = np.random.default_rng(r)
        items, seen = reservoir(0, [], list(range(8)), k, g)  # added in two parts
        items, seen = reservoir(seen, items, list(range(8, N)), k, g)
        assert seen == N and len(items) == k == len(set(items))
        hits[items] += 1
    expected = runs * k / N
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom
    # and a biased "reservoir" (always keep the first k) fails the same test
    biased = np.zeros(N)
    biased[:k] = runs
    assert float(((biased - expected) ** 2 / expected).sum()) > 43.8


def _tiny_model(tok, seed=0):
    from factlab.model.build import build_model

    return build_model("gpt2-rope", "tiny", len(tok), 128, bos_id=tok.bos_token_id,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed)


def test_ewc_penalty_zero_at_anchor_and_fisher_positive():
    from factlab.tokens.tokenizer import world_tokenizer

    w = base_world(seed=3)
    tok = world_tokenizer(w, 1000)
    model = _tiny_model(tok)
    data = experience_data(w, tok, 0)
    stream = FactStream(data, 128, tok, qa_ratio=0.5)
    F = diagonal_fisher(model, stream, 8)
    allv = torch.cat([v.flatten() for v in F.values()])
    assert (allv >= 0).all() and float(allv.sum()) > 0
    assert all(p.grad is None for p in model.parameters())  # leaves no gradient behind

    class L:  # the fields of a loop EWC reads
        pass

    loop = L()
    loop.model, loop.stream, loop.tokenizer = model, stream, tok
    e = EWC(data, lam=10.0, samples=8)
    e.before_experience(loop, 1)  # consolidates the base (experience 0)
    assert e.done == 0 and len(e.anchors) == 1
    assert float(e.penalty(model).detach()) == 0.0
    with torch.no_grad():
        p = next(q for q in model.parameters() if q.requires_grad)
        p.add_(0.01)
    pen = float(e.penalty(model).detach())
    assert pen > 0
    # the penalty is lam/2 * sum F (d)^2 exactly
    name = next(n for n, q in model.named_parameters() if q is p)
    F0 = e.anchors[0][1][name]  # its own estimate (other examples than F's above)
    assert pen == pytest.approx(5.0 * float((F0 * 0.01 ** 2).sum()), rel=1e-3)
    # state survives a save and load
    e2 = EWC(data, lam=10.0)
    e2.load_state_dict(copy.deepcopy(e.state_dict()))
    assert float(e2.penalty(model).detach()) == pytest.approx(pen)


def test_lwf_term_is_zero_when_teacher_is_student():
    from factlab.tokens.tokenizer import world_tokenizer
    from factlab.train.lm_loss import causal_lm_loss, output_head

    x = torch.randn(7, 11)
    assert float(distillation_kl(x, x.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(x, torch.randn(7, 11), 2.0)) > 0
    w = base_world(seed=3)
    tok = world_tokenizer(w, 1000)
    model = _tiny_model(tok)
    stream = FactStream(experience_data(w, tok, 0), 128, tok)
    batch = {k: torch.from_numpy(v) for k, v in stream.sequences(0, 4).items()}

    class L:
        pass

    loop = L()
    loop.model, loop.stream = model, stream
    lwf = LwF(temperature=2.0)
    lwf.before_experience(loop, 1)
    _, out = causal_lm_loss(model, output_head(model), batch)
    assert float(lwf.extra_loss(loop, batch, out)) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # (a constant shift would pass through the layer norms)
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    _, out = causal_lm_loss(model, output_head(model), batch)
    assert float(lwf.extra_loss(loop, batch, out)) > 1e-4


def test_replay_buffer_sizes_and_selection():
    from factlab.tokens.tokenizer import world_tokenizer

    base = base_world(seed=3)
    s = make_stream(base, StreamConfig(cohorts=2, people=6, updates=0))
    tok = world_tokenizer(s, 1000)
    data = [experience_data(s, tok, t) for t in range(3)]

    class D:
        pass

    class L:
        pass

    loop = L()
    loop.driver = D()
    loop.driver.experiences = [type("E", (), {"stream": FactStream(d, 128, tok)})()
                               for d in data[1:]]
    loop.tokenizer = tok
    seen = len(data[0]) + len(data[1])
    for sel in ("random", "recency", "diversity"):
        r = Replay(data[0], size=10, selection=sel, seed=0)
        loop.stream = FactStream(data[2], 128, tok)
        r.before_experience(loop, 2)
        assert len(r.items) == 10 and r.n_seen == seen and len(set(r.items)) == 10
        if sel == "recency":  # the latest: experience 1's questions, last ones
            assert all(j == 1 for j, _, _ in r.items)
        if sel == "diversity":  # ten different people
            assert len({r._person(loop, it) for it in r.items}) == 10
        assert loop.stream.sequences(0, 16)["input_ids"].shape == (16, 128)
    full = Replay(data[0], seed=0)
    loop.stream = FactStream(data[2], 128, tok)
    full.before_experience(loop, 2)
    assert len(full.items) == seen and full.buffer_stats["examples"] == seen
    frac = Replay(data[0], size=0.5, seed=0)
    loop.stream = FactStream(data[2], 128, tok)
    frac.before_experience(loop, 2)
    assert len(frac.items) == round(0.5 * seen)
    with pytest.raises(FactlabError):
        Replay(size=1.5)


# ------------------------------------------------------------ a stream run, tiny
@pytest.fixture(scope="module")
def tiny_cell(tmp_path_factory):
    """A run cell's layout (world, tokenizer, finetune/model) whose model knows its world:
    a tiny model trained on the base world's bios and P_train questions."""
    from factlab.tokens.tokenizer import world_tokenizer
    from factlab.train import Loop, TrainConfig

    tmp = tmp_path_factory.mktemp("continual")
    cell = tmp / "cell"
    w = base_world(seed=3, people=16, unknown=4)
    save_world(w, cell / "world")
    w = load_world(cell / "world")
    tok = world_tokenizer(w, 1000)
    tok.save_pretrained(cell / "tokenizer")
    model = _tiny_model(tok)
    torch.manual_seed(0)
    Loop(model, FactStream(experience_data(w, tok, 0), 128, tok, qa_ratio=0.5),
         TrainConfig(steps=500, batch_size=16, lr=3e-3, log_every=100, precision="no",
                     ckpt_minutes=0, warmup=20), tmp / "train", progress=False, export=False,
         keep_checkpoint=False).run()
    model.save_pretrained(cell / "finetune" / "model")
    return cell


def _settings(cell, **kw):
    from factlab.experiments.continual import ContinualSettings

    kw.setdefault("make", {"cohorts": 1, "people": 6, "updates": 0.25})
    kw.setdefault("select", {})  # settings as given (selection: the continual-full test)
    return ContinualSettings(base=str(cell), steps=kw.pop("steps", 60), lr=3e-3, eval_people=8,
                             parallel=1, **kw)


def test_replay_forgets_less_than_sequential(tiny_cell, tmp_path):
    from factlab.experiments.continual import run_continual

    res = run_continual(_settings(tiny_cell, methods=["sequential", "replay"]), tmp_path / "r",
                        progress=False)
    by = {m["method"]: m["summary"] for m in res["methods"]}
    before = by["sequential"]["ckl"]["invariant_before"]
    assert before > 0.5  # the base knows its world
    seq, rep = (by[m]["ckl"]["invariant_retention"] for m in ("sequential", "replay"))
    assert rep > seq + 0.1, (seq, rep)
    # both learn the stream: the cohort's trained questions and the updates
    for m in ("sequential", "replay"):
        R = by[m]["matrix_id"]
        assert R[1][1] > R[0][1] + 0.3
    # every number is recomputable from the saved predictions
    from factlab.continual import metrics as M
    from factlab.io import read_jsonl

    rows = {t: list(read_jsonl(tmp_path / "r" / "replay" / "predictions" / f"t{t}_facts.jsonl"))
            for t in (0, 1, 2)}
    assert M.summary(rows, 2)["matrix"] == by["replay"]["matrix"]


def test_killed_stream_run_resumes_to_the_same_matrix(tiny_cell, tmp_path, monkeypatch):
    from factlab.continual import methods
    from factlab.experiments.continual import run_continual

    cfg = _settings(tiny_cell, methods=["reservoir"], steps=30,
                    make={"cohorts": 2, "people": 4, "updates": 0.25},
                    replay={"size": 40})
    whole = run_continual(cfg, tmp_path / "whole", progress=False)
    real = methods.Replay.before_experience
    calls = {"n": 0}

    def dies_at_2(self, loop, t):
        if t == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(self, loop, t)

    monkeypatch.setattr(methods.Replay, "before_experience", dies_at_2)
    with pytest.raises(KeyboardInterrupt):
        run_continual(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(methods.Replay, "before_experience", real)
    R = json.loads((tmp_path / "cut" / "reservoir" / "R.json").read_text())
    assert [r["t"] for r in R["rows"]] == [0, 1]
    again = run_continual(cfg, tmp_path / "cut", progress=False)
    a, b = whole["methods"][0]["summary"], again["methods"][0]["summary"]
    assert a["matrix"] == b["matrix"] and a["ckl"] == b["ckl"]


def test_run_continual_every_method_and_the_cli(tiny_cell, tmp_path):
    out = tmp_path / "all"
    args = ["run", "continual", f"base={tiny_cell}", "steps=10", "eval_people=4",
            "parallel=1", "make.cohorts=1", "make.people=4", "make.updates=0.25",
            "methods=[sequential,lora,joint,cumulative,replay,reservoir,generative,ewc,online_ewc,"
            "lwf,l2p,dualprompt,coda,l2p_prefix,dualprompt_prefix]", "prompts.top=2",
            "prompts.length=2",
            "prompts.g_length=2", "ewc.samples=4", "select={}", "--out", out]
    assert cli(*args) == 0
    res = json.loads((out / "results.json").read_text())
    names = [m["method"] for m in res["methods"]]
    assert len(names) == 15
    for m in res["methods"]:
        s = m["summary"]
        assert len(s["matrix"]) == 3 and s["ckl"]["n_updated"] > 0
        assert m["cost"]["steps"] == 20
    cost = {m["method"]: m["cost"] for m in res["methods"]}
    assert cost["replay"]["buffer_examples"] > 0 and cost["lwf"]["extra_forward_per_row"] == 1
    assert cost["lora"]["trainable_params"] < cost["sequential"]["trainable_params"]
    pools = {m["method"]: m["prompts"] for m in res["methods"] if m.get("prompts")}
    assert set(pools) == {"l2p", "dualprompt", "coda", "l2p_prefix", "dualprompt_prefix"}
    assert pools["l2p"]["prompt_positions"] == 4 and pools["dualprompt"]["prompt_positions"] == 4
    assert pools["l2p_prefix"]["prompt_positions"] == 4
    assert pools["dualprompt_prefix"]["prompt_positions"] == 2  # G and E on their own layers
    assert cost["l2p_prefix"]["trainable_params"] > cost["l2p"]["trainable_params"]
    assert sum(pools["l2p"]["usage"][1]) == 10 * 8 * 2  # steps x rows x top, experience 1
    assert sum(pools["dualprompt"]["usage"][1]) == 10 * 8  # top-1, its own E-prompt
    assert pools["dualprompt"]["usage"][1][0] == 10 * 8
    assert 0 <= pools["l2p"]["matching_rate"] <= 1
    assert cost["coda"]["added_params_per_experience"] > 0
    report = (out / "report.md").read_text()
    assert "FUAR" in report and "forgetting" in report.lower()
    assert "matching rate" in report
    assert "are the pseudo-bios true" in report
    assert cli(*args) == 0  # again: every finished method is read back
    bad = ["run", "continual", f"base={tiny_cell}", "methods=[nope]", "--out", tmp_path / "b"]
    assert cli(*bad) == 2
    assert cli("run", "continual", f"base={tiny_cell}", "ewc.lam=-1", "--out",
               tmp_path / "b2") == 2
    assert cli("run", "continual", f"base={tiny_cell}", "methods=[l2p]", "prompts.length=60",
               "select={}", "parallel=1", "--out", tmp_path / "b3") == 2


def test_continual_full_aggregates_seeds_and_orders(tiny_cell, tmp_path):
    out = tmp_path / "full"
    args = ["run", "continual-full", f"base={tiny_cell}", "steps=8", "eval_people=4",
            "parallel=1", "make.people=4", "make.updates=0.25", "methods=[sequential,ewc]",
            "seeds=[0,1]", "orders=[[cohort,update],[update,cohort]]",
            "select={ewc.lam: [1.0, 1000.0]}", "ewc.samples=4", "--out", out]
    assert cli(*args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in res["cells"]] == ["s0-c-u", "s1-c-u", "s0-u-c", "s1-u-c"]
    # the settings were chosen once, on the validation stream, and used in every cell
    lam = res["select"]["ewc"]["chosen"]["ewc.lam"]
    assert lam in (1.0, 1000.0) and "sequential" not in res["select"]
    for c in res["cells"]:
        ewc = next(m for m in c["methods"] if m["method"] == "ewc")
        assert ewc["settings"]["ewc"]["lam"] == lam
        assert [s["kind"] for s in c["stream"]["experiences"]] == list(c["order"])
    a = res["aggregate"]["sequential"]["A_T (with base)"]
    vals = [next(m for m in c["methods"] if m["method"] == "sequential")["summary"]
            ["matrix_summary"]["average_accuracy_with_base"] for c in res["cells"]]
    assert a["values"] == vals and a["mean"] == pytest.approx(float(np.mean(vals)))
    assert a["std"] == pytest.approx(float(np.std(vals, ddof=1)))
    assert "Ranking by mean A_T" in (out / "report.md").read_text()


def test_generative_replay_precision_is_computed_against_the_truth():
    from factlab.experiments.continual import pseudo_judge

    base = base_world(seed=3, augment="multi2")
    s = make_stream(base, StreamConfig(cohorts=1, people=4, updates=0.25, order=["update",
                                                                                "cohort"]))
    judge = pseudo_judge(s)
    w = s.world
    # real bios of the base world, before the update (t = 1): every fact true
    texts = list(base.bios().text[:6])
    got = judge(texts, 1)
    assert got["facts"] == 36 and got["true"] == 36 and got["precision"] == 1.0
    # after the update the old employer is false for the updated people
    moved = sorted(set(w.updates.person.tolist()))
    p = moved[0]
    old_bio = next(t for t, q in zip(base.bios().text, base.bios().person) if q == p)
    after = judge([old_bio], 2)
    n_changed = int((w.updates.person == p).sum())
    assert after["true"] == 6 - n_changed and after["facts_of_known_people"] == 6
    # a cohort member is not known before the cohort arrives; an invented name is invented
    c = int(w.ids(arrival=2)[0])
    cbio = next(t for t, q in zip(s.cohort_bios(2).text, s.cohort_bios(2).person) if q == c)
    assert judge([cbio], 2)["invented_person_facts"] == 6
    assert judge([cbio], 3)["true"] == 6
    fake = texts[0].replace(base.people.names[int(base.bios().person[0])], "Zed Quux Blorp")
    j = judge([fake], 1)
    assert j["invented_person_facts"] == 6 and j["precision"] == 0.0


def test_user_stream_from_fact_files(tmp_path, capsys):
    f0, f1, f2 = (tmp_path / f"f{i}.csv" for i in range(3))
    f0.write_text("entity,attribute,value\nEiffel Tower,city,Paris\nEiffel Tower,height,330 m\n"
                  "Big Ben,city,London\nBig Ben,height,96 m\nColosseum,city,Rome\n"
                  "Space Needle,city,Seattle\n")
    f1.write_text("entity,attribute,value\nBurj Khalifa,city,Dubai\nCN Tower,city,Toronto\n"
                  "Big Ben,height,97 m\nColosseum,city,Rome\nColosseum,height,48 m\n")
    f2.write_text("entity,attribute,value\nBig Ben,height,98 m\nBurj Khalifa,city,Abu Dhabi\n")
    out = tmp_path / "s"
    assert cli("stream", "make", out, "--facts", f0, "--facts", f1, "--facts", f2) == 0
    corpus, meta = load_stream(out)
    recs = {(r["question"], r["label"]): r for r in stream_facts(corpus).records()}
    big = recs[("What is the height of Big Ben?", "updated")]
    assert big["answer"] == "98 m" and big["stale"] == "96 m" and big["experience"] == 2
    assert recs[("What is the city of Burj Khalifa?", "updated")]["stale"] == "Dubai"
    assert recs[("What is the city of Colosseum?", "invariant")]["answer"] == "Rome"
    # a value the entity had none of is a new fact, in the experience that states it
    assert recs[("What is the height of Colosseum?", "new")]["experience"] == 1
    assert recs[("What is the city of CN Tower?", "new")]["experience"] == 1
    assert [e["kind"] for e in meta["experiences"]] == ["cohort+update", "update"]
    # an attribute the base lacks is a new kind of fact: known entities gain it as new facts
    col = tmp_path / "color.csv"
    col.write_text("entity,attribute,value\nBig Ben,color,gold\nTaipei 101,color,green\n")
    assert cli("stream", "make", tmp_path / "c", "--facts", f0, "--facts", col) == 0
    c2, _ = load_stream(tmp_path / "c")
    assert c2.attributes == ("city", "height", "color")
    rc = {(r["question"], r["label"]): r for r in stream_facts(c2).records()}
    assert rc[("What is the color of Big Ben?", "new")]["answer"] == "gold"
    assert rc[("What is the color of Taipei 101?", "new")]["experience"] == 1
    assert rc[("What is the city of Big Ben?", "invariant")]["answer"] == "London"
    assert not any(q == "What is the color of Colosseum?" for q, _ in rc)
    # bad input: a file with a bad row, a file adding nothing
    bad = tmp_path / "bad.csv"
    bad.write_text("entity,attribute,value\nBig Ben,,x\n")
    assert cli("stream", "make", tmp_path / "b1", "--facts", f0, "--facts", bad) == 2
    assert cli("stream", "make", tmp_path / "b3", "--facts", f0, "--facts", f0) == 2
    assert not any((tmp_path / b).exists() for b in ("b1", "b3"))
    capsys.readouterr()


def test_a_biography_world_then_fact_files_of_other_kinds(tmp_path):
    """make.facts: a user's fact files after a world's cohorts, each one experience whose
    entities and attributes are its own (inputs that separate the experiences)."""
    base = make(people=30)
    ships = tmp_path / "ships.csv"
    ships.write_text("entity,attribute,value\nHMS Arvel,home port,Port Sal\n"
                     "HMS Arvel,builder,Koral Yards\nSS Quill,home port,Eastmere\n"
                     "SS Quill,launch year,1911\nMV Tess,builder,Koral Yards\n")
    chem = tmp_path / "chem.jsonl"
    chem.write_text("".join(json.dumps({"entity": e, "attribute": a, "value": v}) + "\n"
                            for e, a, v in [("Velorine", "melting point", "120 degrees"),
                                            ("Dunate", "melting point", "75 degrees"),
                                            ("SS Quill", "home port", "Port Sal")]))
    cfg = StreamConfig(cohorts=1, people=4, updates=0, facts=[str(ships), str(chem)], seed=3)
    s = make_stream(base, cfg)
    assert s.experiences == [1, 2, 3] and kinds_of(s) == ["cohort", "cohort", "cohort+update"]
    A = len(base.attributes)
    assert s.attributes == base.attributes + ("home port", "builder", "launch year",
                                               "melting point")
    w = s.world
    quill = w.people.names.index("SS Quill")
    assert w.arrival[quill] == 2 and w.people.value(quill, "launch year") == "1911"
    assert (w.people.codes[: len(base.people), A:] == -1).all()  # nobody else has them
    # the base world's text and facts are unchanged; its cached bios gained empty columns
    assert list(s.bios().text) == list(base.bios().text)
    c1 = make_stream(base, cfg.model_copy(update={"facts": []}))
    assert list(s.cohort_bios(1).text) == list(c1.cohort_bios(1).text)
    assert base.qa().question == s.qa().question
    assert s.bios().spans.shape[1] == len(s.attributes) and (s.bios().spans[:, A:] == -1).all()
    recs = stream_facts(s).records()
    mine = [r for r in recs if r["attribute"] in s.attributes[A:]]
    assert {(r["question"], r["label"], r["experience"]) for r in mine} == {
        ("What is the home port of HMS Arvel?", "new", 2),
        ("What is the builder of HMS Arvel?", "new", 2),
        ("What is the home port of SS Quill?", "updated", 3),
        ("What is the launch year of SS Quill?", "new", 2),
        ("What is the builder of MV Tess?", "new", 2),
        ("What is the melting point of Velorine?", "new", 3),
        ("What is the melting point of Dunate?", "new", 3)}
    bios = s.cohort_bios(2)
    for d, text in enumerate(bios.text):
        for a, (lo, hi) in enumerate(bios.spans[d].tolist()):
            if lo >= 0:
                assert text[lo:hi] == w.people.value(int(bios.person[d]), a)
    assert any("Koral Yards" in t for t in bios.text)
    # saved and loaded: the same attributes, facts and text
    save_stream(s, tmp_path / "st", cfg=cfg)
    s2, meta = load_stream(tmp_path / "st")
    assert s2.attributes == s.attributes and stream_facts(s2).records() == recs
    assert list(s2.cohort_bios(3).text) == list(s.cohort_bios(3).text)
    assert meta["config"]["facts"] == [str(ships), str(chem)]
    # bad input: a fact file that does not exist; one naming an unknown person
    with pytest.raises(FactlabError, match="nope.csv: no such file"):
        make_stream(base, cfg.model_copy(update={"facts": [str(tmp_path / "nope.csv")]}))
    who = tmp_path / "who.csv"
    who.write_text(f"entity,attribute,value\nHMS Arvel,home port,Y\n"
                   f"{base.unknown.names[0]},home port,X\n")
    with pytest.raises(FactlabError, match="unknown people"):
        make_stream(base, cfg.model_copy(update={"facts": [str(who)]}))


def test_continual_on_a_user_stream_and_model(tiny_cell, tmp_path):
    f0, f1 = tmp_path / "f0.jsonl", tmp_path / "f1.jsonl"
    rows0 = [("Eiffel Tower", "city", "Paris"), ("Big Ben", "city", "London"),
             ("Colosseum", "city", "Rome"), ("Space Needle", "city", "Seattle")]
    rows1 = [("Burj Khalifa", "city", "Dubai"), ("CN Tower", "city", "Toronto"),
             ("Big Ben", "city", "Paris")]
    for f, rows in ((f0, rows0), (f1, rows1)):
        f.write_text("".join(json.dumps({"entity": e, "attribute": a, "value": v}) + "\n"
                             for e, a, v in rows))
    s = tmp_path / "s"
    assert cli("stream", "make", s, "--facts", f0, "--facts", f1, "--model",
               tiny_cell / "finetune" / "model", "--tokenizer", tiny_cell / "tokenizer") == 0
    out = tmp_path / "run"
    assert cli("run", "continual", f"stream={s}", "methods=[sequential,replay,adapters,olora]",
               "steps=5", "parallel=1", "--out", out) == 0  # lr chosen on its own base world
    res = json.loads((out / "results.json").read_text())
    assert res["methods"][0]["select"]["chosen"]["lr"] in (3e-4, 1e-3)
    c = res["methods"][0]["summary"]["ckl"]
    assert c["n_updated"] == 1 and c["n_new"] == 2 and c["n_invariant"] == 3
    # the router keys on the user's entity names: the new entities' questions and Big Ben's
    # update find the second file's adapter (an entity seen only in a bio can miss: this
    # tiny model's name states after "What is the city of" are far from a text's start)
    r = res["methods"][2]["routing"]
    by = r["routing_accuracy_by_label"]
    assert by["new"] == by["updated"] == 1.0, r["misrouted"]
    assert r["routing_accuracy_by_experience"]["1"] == 1.0
    ol = res["methods"][3]  # O-LoRA: the adapters summed, nothing routed, no keys
    assert "routing" not in ol and ol["cost"]["router_keys"] == 0
    assert ol["cost"]["adapters"] == 1 and ol["cost"]["extra_forward_per_row"] == 0
    assert ol["settings"]["adapters"]["ortho"] == 0.5


def test_killed_prompt_pool_run_resumes_to_the_same_matrix(tiny_cell, tmp_path, monkeypatch):
    """CODA's components are initialised per experience (orthogonal to the earlier ones)
    and its usage and init flags are state: a resumed run trains the same prompts."""
    from factlab.continual import prompts
    from factlab.experiments.continual import run_continual

    cfg = _settings(tiny_cell, methods=["coda"], steps=20,
                    make={"cohorts": 2, "people": 4, "updates": 0.25},
                    prompts={"length": 2, "size": 6, "lr": 3e-2})
    whole = run_continual(cfg, tmp_path / "whole", progress=False)

    def dies_at_2(self, loop, t):
        if t == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(prompts.PromptLearning, "before_experience", dies_at_2, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run_continual(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    again = run_continual(cfg, tmp_path / "cut", progress=False)
    a, b = whole["methods"][0], again["methods"][0]
    assert a["summary"]["matrix"] == b["summary"]["matrix"]
    assert a["prompts"]["mean_alpha"] == b["prompts"]["mean_alpha"]
