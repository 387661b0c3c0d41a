"""`factlab memory tune / ask` end to end on a tiny model and world, the editing metrics
as pure functions, and bad input (one error, exit 2, nothing written)."""

import json

import pytest

from factlab.corpus.store import save_world
from factlab.errors import FactlabError
from factlab.memory import metrics as M
from factlab.memory.model import MemoryModel
from factlab.model.build import build_model
from factlab.model.load import load_any
from factlab.tokens.tokenizer import world_tokenizer

from conftest import cli, make


def test_auroc_locality_and_hallucination_metrics():
    assert M.auroc([3, 4], [1, 2]) == 1.0 and M.auroc([1, 2], [3, 4]) == 0.0
    assert M.auroc([1, 2], [1, 2]) == 0.5  # ties count half
    assert M.auroc([0.9, 0.2], [0.5]) == 0.5
    assert M.locality(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    h = M.unknown_hallucination([" AB12", "", "unknown", "zz"], ["AB12", "CD34"])
    assert h == {"answered": 0.5, "stored_value": 0.25}
    s = M.slot_sharing([{1, 2}, {2, 3}, {4}])
    assert s["slots_used"] == 4 and s["shared_slots"] == 1 and s["facts_sharing"] == 2
    assert M.reliable_below([0.01, 0.02, 0.5, 0.9], [True, True, False, True]) == 0.5
    assert M.reliable_below([0.5], [False]) is None
    assert M.exact_match([" A", "B"], ["A", "C"]) == 0.5
    # teacher-forced locality: per prompt the share of positions whose argmax is kept
    assert M.token_agreement([[1, 2, 3, 4], [5]], [[1, 2, 0, 4], [6]]) == (0.75 + 0.0) / 2
    assert M.token_agreement([[7, 8]], [[7, 8]]) == 1.0
    with pytest.raises(ValueError):
        M.token_agreement([[1, 2]], [[1]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memcli")
    world = make(people=20, seed=2, unknown=4)
    save_world(world, tmp / "world")
    tok = world_tokenizer(world, 400)
    model = build_model("gpt2-rope", "tiny", len(tok), 128, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    # trained briefly on the world's questions: a random-init model's states hardly tell
    # positions and names apart, and its head has no learned magnitudes
    from factlab.tokens.encode import encode_qa
    from factlab.tokens.streams import QAStream
    from factlab.train import Loop, TrainConfig

    Loop(model, QAStream(encode_qa(tok, world.qa()), 64, tok.pad_token_id, pack=False),
         TrainConfig(steps=300, batch_size=32, lr=3e-3, log_every=100, precision="no",
                     ckpt_minutes=0), tmp / "train", progress=False, export=False,
         keep_checkpoint=False).run()
    model.save_pretrained(tmp / "hf")
    tok.save_pretrained(tmp / "hf")
    return tmp


SMALL = ["--set", "n_keys=32", "--set", "topk=4", "--set", "key_dim=16", "--set", "max_exposures=600",
         "--set", "locality_per_set=40", "--no-progress"]


def test_memory_tune_random_facts_then_ask(tiny, capsys):
    out = tiny / "mem"
    assert cli("memory", "tune", tiny / "hf", "--random", 16, "--world", tiny / "world",
               "--out", out, "--minutes", 10, *SMALL) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tuning"]["all_done"]
    assert res["reliability"]["generation_exact_match"] == 1.0
    assert res["reliability"]["bank_zeroed"] == res["reliability"]["backbone_before"] == 0.0
    # the key gate: no answer of the backbone's changes on any locality set, and the
    # gate's score tells stored from never-stored questions
    assert {k: v["unchanged"] for k, v in res["locality"].items()} == \
        {"own": 1.0, "never_stored": 1.0, "stored_entities": 1.0}
    assert res["locality"]["own"]["ood_after"] == res["locality"]["own"]["ood_before"]
    assert res["abstention"]["auroc_stored_vs_never_stored"] == 1.0
    # teacher-forced beside: closed, the gate leaves the backbone's logits exact, so every
    # token of the backbone's own answers is still the argmax
    assert res["reliability"]["teacher_forced_all_argmax"] == 1.0
    assert {k: v["unchanged_teacher_forced"] for k, v in res["locality"].items()} == \
        {"own": 1.0, "never_stored": 1.0, "stored_entities": 1.0}
    assert res["answer_latency_ms"]["backbone"] > 0 and res["answer_latency_ms"]["memory"] > 0
    text = (out / "report.md").read_text()
    assert "reliability (greedy exact match" in text and "teacher-forced: the backbone" in text
    fact = json.loads((out / "predictions_facts.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert cli("memory", "ask", out, fact["question"]) == 0
    said = capsys.readouterr().out
    assert said.splitlines()[0].strip() == fact["answer"] and "holds this question" in said
    # the prompt format the facts were stored in travels with the saved memory model
    marker = json.loads((out / "model" / "factlab_wrapper.json").read_text())
    assert marker["config"]["prompt_format"] == "plain"
    with pytest.raises(FactlabError, match="prompt_format"):
        MemoryModel(load_any(tiny / "hf"), prompt_format="xml")
    # the same command again: the finished run resumes (nothing to do), same results
    assert cli("memory", "tune", tiny / "hf", "--random", 16, "--world", tiny / "world",
               "--out", out, "--minutes", 10, *SMALL) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["reliability"] == res["reliability"]


def test_sequential_writes_of_world_valued_facts_end_to_end(tiny):
    out = tiny / "seq"
    assert cli("memory", "tune", tiny / "hf", "--random", 8, "--values", "birth_city",
               "--world", tiny / "world", "--out", out, "--set", "writes=8",
               "--set", "routing=key", "--set", "eval_points=2",
               "--set", "baselines=[full]", *SMALL) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["reliability"]["generation_exact_match"] == 1.0
    assert "8 sequential writes" in res["reliability"]["measured"]
    assert {k: v["unchanged"] for k, v in res["locality"].items()} == \
        {"own": 1.0, "never_stored": 1.0, "stored_entities": 1.0}
    curve = res["sequential"]["curve"]
    assert [r["writes"] for r in curve] == [0, 4, 8] and curve[-1]["written"] == 1.0
    assert res["slot_sharing"]["shared_slots"] == 0  # key routing: no row is shared
    assert "generalization" in res and "generalization" in res["baselines"]["full"]
    full = res["baselines"]["full"]
    # the finetuned baseline is read teacher-forced too: where a greedy answer changed, a
    # token of the backbone's answer stopped being the argmax, so the share falls below 1
    assert 0 <= full["reliability_teacher_forced"] <= 1
    assert 0 <= full["generalization_teacher_forced"] <= 1
    changed = [v for v in full["locality"].values() if v["unchanged"] < 1]
    assert changed and all(v["unchanged_teacher_forced"] < 1 for v in changed)
    assert 0 <= res["generalization"]["teacher_forced_all_argmax"] <= 1
    assert res["baselines"]["full"]["steps"] >= 8  # one experience per write
    assert "Sequential writes: 8 writes" in (out / "report.md").read_text()


def test_without_a_world_locality_is_general_knowledge_and_never_stored_names(tiny):
    from factlab.evaluate.general import contains_answer, general_knowledge

    gk = general_knowledge()
    assert len(gk) == 100 and len(set(gk.question)) == 100 and "capital" in gk.attributes
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert contains_answer("It is the Nile, in Africa", "The Nile")
    assert not contains_answer("The capital of Brazil is Sao Paulo", "Brasília")
    out = tiny / "noworld"
    assert cli("memory", "tune", tiny / "hf", "--random", 8, "--out", out, *SMALL,
               "--set", "max_exposures=2000") == 0  # (600 left 6-7 of 8 to the budget)
    res = json.loads((out / "results.json").read_text())
    assert res["reliability"]["generation_exact_match"] == 1.0
    loc = res["locality"]
    # (and the shipped canonical questions of other attributes about the stored names)
    assert set(loc) == {"general", "never_stored", "stored_entities"}
    assert loc["general"]["prompts"] == 20 and loc["stored_entities"]["prompts"] == 20
    assert {k: v["unchanged"] for k, v in loc.items()} == \
        {"general": 1.0, "never_stored": 1.0, "stored_entities": 1.0}
    assert loc["general"]["accuracy_after"] == loc["general"]["accuracy_before"]
    # generalization without a world: the generic held-out phrasings of every stored fact
    g = res["generalization"]
    assert g["prompts"] == 8 and 0.0 <= g["gate_open"] <= 1.0
    assert 0.0 <= g["generation_exact_match"] <= 1.0 and g["backbone"] == 0.0
    # the radius was chosen on the validation halves, so the gate's score is a measure
    assert res["abstention"]["auroc_stored_vs_never_stored"] > 0.9
    assert "general knowledge: the answer in the reply" in (out / "report.md").read_text()


def test_the_entity_gate_end_to_end(tiny, capsys):
    out = tiny / "entity"
    assert cli("memory", "tune", tiny / "hf", "--random", 8, "--values", "birth_city",
               "--world", tiny / "world", "--out", out, "--set", "routing=key",
               "--set", "gate=entity", "--set", "relation_names=20", *SMALL) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["reliability"]["generation_exact_match"] == 1.0
    assert res["reliability"]["bank_zeroed"] == res["reliability"]["backbone_before"]
    g = res["entity_gate"]
    assert g["relations"] == ["birth city"] and 0 < g["radius"] < 1
    assert g["fit"]["positives"] == 8 + 20  # the stored questions + 20 other names
    # the gate's thresholds sit above every validation negative; the test halves are
    # what is reported (here every answer of theirs unchanged)
    assert set(res["locality"]) == {"own", "never_stored", "stored_entities"}
    assert min(v["unchanged"] for v in res["locality"].values()) >= 0.95
    assert 0 <= res["generalization"]["gate_open"] <= 1
    assert 0 <= res["abstention"]["auroc_paraphrase_vs_never_stored"] <= 1
    assert "entity radius" in (out / "report.md").read_text()
    fact = json.loads((out / "predictions_facts.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert cli("memory", "ask", out, fact["question"]) == 0
    said = capsys.readouterr().out
    assert said.splitlines()[0].strip() == fact["answer"] and "stored fact 0" in said


def test_memory_tune_bad_input(tiny, tmp_path):
    hf, w = tiny / "hf", tiny / "world"
    assert cli("memory", "tune", hf, "--out", tmp_path / "a") == 2  # neither facts nor random
    assert cli("memory", "tune", hf, "--random", 4, "--values", "major",
               "--out", tmp_path / "b") == 2  # world values without a world (birth_city only)
    assert cli("memory", "tune", hf, "--random", 4, "--world", w, "--out", tmp_path / "c",
               "--set", "bogus=1") == 2
    assert cli("memory", "tune", hf, "--random", 4, "--world", w, "--out", tmp_path / "d",
               "--set", "tau=0") == 2
    assert cli("memory", "tune", hf, "--random", 4, "--world", w, "--out", tmp_path / "d",
               "--set", "routing=magic") == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entity": "A", "attribute": "code", "value": "1"}\n{"entity": "B"}\n')
    assert cli("memory", "tune", hf, "--facts", bad, "--out", tmp_path / "e") == 2
    assert cli("memory", "tune", tmp_path / "nope", "--random", 4, "--world", w,
               "--out", tmp_path / "f") == 2
    big = ["--set", "n_keys=1000000"]  # 10^12 slots: refused before anything is built
    assert cli("memory", "tune", hf, "--random", 4, "--world", w, "--out", tmp_path / "g",
               *big) == 2
    for args in (["--set", "writes=5"],  # 4 facts cannot make 5 writes
                 ["--set", "routing=key", "--set", "gate=none"],  # key routing needs keys
                 ["--set", "routing=key", "--set", "n_keys=4"],  # 4 x span rows > 16 slots
                 ["--set", "gate=entity"],  # the entity gate reads key-routed rows
                 ["--set", "gate=entity", "--set", "routing=key", "--set", "writes=2"],
                 ["--values", "shoe_size"]):  # not an attribute of the world
        assert cli("memory", "tune", hf, "--random", 4, "--world", w, "--out",
                   tmp_path / "h", *args) == 2
    assert cli("memory", "tune", hf, "--facts", bad, "--values", "birth_city",
               "--out", tmp_path / "h") == 2  # --values goes with --random
    assert cli("memory", "tune", hf, "--random", 4, "--out", tmp_path / "h",
               "--set", "prompt_format=chat") == 2  # the tokenizer has no chat template
    # a family whose decoder layers the bank cannot find (MPT keeps them at
    # transformer.blocks), and answers longer than the model's context
    from transformers import MptConfig, MptForCausalLM

    c = load_any(hf).config

    def with_tokenizer(model, d):
        model.save_pretrained(d)
        for f in hf.glob("tokenizer*"):
            (d / f.name).write_bytes(f.read_bytes())
        return d

    mpt = with_tokenizer(MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=2,
                                                  vocab_size=c.vocab_size, max_seq_len=128)),
                         tmp_path / "mpt")
    assert cli("memory", "tune", mpt, "--random", 4, "--world", w, "--out", tmp_path / "i") == 2
    short = with_tokenizer(build_model("gpt2-rope", "tiny", c.vocab_size, 16,  # 16 tokens
                                       bos_id=c.bos_token_id, eos_id=c.eos_token_id,
                                       pad_id=c.pad_token_id), tmp_path / "short")
    assert cli("memory", "tune", short, "--random", 4, "--world", w,
               "--out", tmp_path / "j") == 2  # 32-character answers do not fit 16 tokens
    for d in "abcdefghij":
        assert not (tmp_path / d).exists() or not any((tmp_path / d).iterdir())
    assert cli("memory", "ask", hf, "What?") == 2  # not a memory model


def test_locality_prompts_never_include_a_stored_question():
    from factlab.errors import FactlabError
    from factlab.memory.facts import attribute_facts, fresh_names
    from factlab.memory.gate import pick_radius
    from factlab.memory.run import locality_sets

    world = make(people=20, seed=2, unknown=4)
    names = fresh_names(world.world, 5, 0)
    q = world.qa().question[1]  # the world's own template for one attribute
    attr = q.split(" of ")[0].replace("What is the ", "")
    facts = attribute_facts(names, ["x"] * 5, attribute=attr)
    assert facts.question[0] == q.replace(world.people.names[int(world.qa().person[1])],
                                          names[0])
    sets = locality_sets(world, facts, names, 0, 200)
    stored = set(facts.question)
    assert all(not stored & set(v.question) for v in sets.values())
    assert len(sets["stored_entities"]) > 0
    with pytest.raises(FactlabError, match="stored question"):
        pick_radius([0.5, 1.0])


def test_paraphrases_of_stored_facts_come_from_the_world_templates():
    from factlab.memory.facts import attribute_facts, fresh_names
    from factlab.memory.run import paraphrases

    world = make(people=20, seed=2, unknown=4)
    names = fresh_names(world.world, 6, 0)
    facts = attribute_facts(names, ["v"] * 6, attribute="birth city")
    para, idx = paraphrases(world, facts, names)
    assert len(para) == 6 and list(idx) == list(range(6))
    for i, q in zip(idx, para.question):
        assert names[i] in q and q != facts.question[i]
    # an attribute the world does not have (access code): the generic held-out phrasings
    gen, idx = paraphrases(world, attribute_facts(names, ["v"] * 6), names)
    assert list(idx) == list(range(6))
    assert gen.question[0] == f"Which access code does {names[0]} have?"
    assert gen.question[1] == f"Tell me the access code of {names[1]}?"
    assert gen.answer == ["v"] * 6 and gen.heldout


def test_paraphrases_without_a_world_are_the_shipped_held_out_phrasings():
    """A pretrained model outside any world: a bioS attribute gets the bioS paraphrases
    (never the stored question), any other name the generic ones."""
    from factlab.memory.facts import attribute_facts, city_valued_facts, fresh_names
    from factlab.memory.run import paraphrases, shipped_paraphrases
    from factlab.text.templates import bios_templates

    names = fresh_names(None, 8, 0)
    facts = city_valued_facts(names, 0)
    para, idx = paraphrases(None, facts, names)
    assert list(idx) == list(range(8)) and para.answer == facts.answer
    held = bios_templates().paraphrases["birth_city"]
    assert para.question[1] == held[1].replace("{name}", names[1])  # "Where was NAME born?"
    assert all(q != facts.question[i] for i, q in zip(idx, para.question))
    assert set(para.question) == {held[i % 4].replace("{name}", names[i]) for i in range(8)}
    assert shipped_paraphrases("home port")[0] == "Which home port does {name} have?"
    # a stored question that is itself the phrasing in turn gets the next phrasing instead
    own = attribute_facts(names[:1], ["x"], question="Which {attribute} does {name} have?")
    p1, _ = paraphrases(None, own, names[:1])
    assert p1.question == [f"Tell me the access code of {names[0]}?"]


def test_random_labels_experiment_end_to_end(tiny, tmp_path):
    import shutil

    cell = tmp_path / "cell"  # a run cell's layout: world, QA-finetuned model, tokenizer
    shutil.copytree(tiny / "world", cell / "world")
    shutil.copytree(tiny / "hf", cell / "finetune" / "model")
    out = tmp_path / "rl"
    args = ["run", "random_labels", f"base={cell}", "facts=6", "baseline_epochs=40",
            "routings=[pinned]", "memory.n_keys=32", "memory.topk=4", "memory.key_dim=16",
            "memory.max_exposures=600", "memory.locality_per_set=40", "memory.minutes=2",
            "memory.baseline_evals=2", "memory.full_lrs=[3e-4,1e-3]", "--out", out]
    assert cli(*args) == 0
    res = json.loads((out / "results.json").read_text())
    for kind in ("true", "random"):
        r = res["kinds"][kind]["pinned"]
        assert r["reliability"]["generation_exact_match"] == 1.0
        assert r["locality"]["own"]["unchanged"] == 1.0
        assert set(r["baselines"]) == {"lora", "full", "lora, own best", "full, own best"}
        best = r["baselines"]["full, own best"]
        assert best["epochs"] == 40 and len(best["curve"]) >= 2
        assert best["best_recall"] == max(c["recall"] for c in best["curve"])
        assert [g["lr"] for g in best["lr_grid"]] == [3e-4, 1e-3]  # the best of the grid
        assert best["best_recall"] == max(g["best_recall"] for g in best["lr_grid"])
        assert "recall_by_max_nll" in best
    # the same questions, true vs random answers
    t, rnd = (json.loads((out / k / "pinned" / "predictions_facts.jsonl").read_text()
                         .splitlines()[0]) for k in ("true", "random"))
    assert t["question"] == rnd["question"] and t["answer"] != rnd["answer"]
    text = (out / "report.md").read_text()
    assert "| random | memory, pinned routing | 100.0%" in text and "own best" in text
    for png in ("recall_by_nll.png", "recall_by_exposures.png", "loss_percentiles.png"):
        assert (out / png).is_file()
    tr = res["kinds"]["random"]["pinned"]["tuning"]["trace"]  # the loss along the tuning
    assert tr[-1]["argmax"] == 1.0 and tr[-1]["nll_p90"] < tr[0]["nll_p90"]
    assert "| random | pinned | 1.0 |" in text  # the trace table, from one exposure on
    assert cli(*args) == 0  # again: every finished run is reused
    assert json.loads((out / "results.json").read_text()) == res
    assert cli("run", "random_labels", f"base={tmp_path / 'nope'}", "--out",
               tmp_path / "rl2") == 2
    assert cli("run", "random_labels", f"base={cell}", "memory.bogus=1", "--out",
               tmp_path / "rl3") == 2
    assert not (tmp_path / "rl2").exists() and not (tmp_path / "rl3").exists()
