"""A whole recipe on a tiny config: world -> tokenizer -> pretrain -> finetune -> evaluate
-> report; saved predictions recompute the reported accuracy; a rerun resumes."""

import json

import pytest

from factlab.errors import FactlabError
from factlab.evaluate.metrics import metrics_from_predictions
from factlab.experiments.recipe import load_recipe
from factlab.experiments.run import run_recipe

TINY = ["world.people=40", "world.unknown=4", "model.size=tiny", "tokenizer.vocab_size=400", "model.context=256",
        "pretrain.steps=12", "pretrain.eval_every=6", "pretrain.log_every=6",
        "finetune.steps=4", "finetune.lora_r_embed=8", "finetune.log_every=2",
        "eval.first_token_people=5", "parallel=1"]


def test_quickstart_recipe_end_to_end_and_resume(tmp_path):
    recipe = load_recipe("quickstart", TINY)
    results = run_recipe(recipe, tmp_path, progress=False)
    assert [r["cell"] for r in results] == ["single", "multi5+permute"]
    report = (tmp_path / "report.md").read_text()
    assert "96.6" in report and "9.7" in report  # the paper's numbers beside ours
    assert (tmp_path / "ood_accuracy.png").stat().st_size > 1000
    for r in results:
        cell = tmp_path / r["cell"]
        for split in ("id", "ood"):
            recs = [json.loads(line) for line in open(cell / f"predictions_{split}.jsonl")]
            assert len(recs) == 6 * 20
            assert metrics_from_predictions(recs) == r[split]
        assert (cell / "finetune/model/model.safetensors").is_file()
        curves = r["curves"]["pretrain"]
        assert curves and "eval/bio_first_token/test" in curves[-1]
        memorised = 100 * curves[-1]["eval/bio_first_token/test"]
        assert f"| {r['cell']} | {memorised:.1f} | {100 * r['id']['exact_match']:.1f} |" in report
    assert results[1]["people"] == 40 and results[0]["params"] > 0
    before = (tmp_path / "single/pretrain/metrics.jsonl").read_text()
    again = run_recipe(recipe, tmp_path, progress=False)  # finished stages are not redone
    assert (tmp_path / "single/pretrain/metrics.jsonl").read_text() == before
    assert again[0]["ood"] == results[0]["ood"]
    with pytest.raises(FactlabError, match="different recipe"):
        run_recipe(load_recipe("quickstart", TINY + ["pretrain.steps=13"]), tmp_path)


def test_recipe_errors():
    with pytest.raises(FactlabError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(FactlabError, match="unknown key"):
        load_recipe("quickstart", ["pretrain.stepz=3"])
    with pytest.raises(FactlabError, match="no cell named"):
        load_recipe("fig3", ["only=multi9"])
    r = load_recipe("fig3", ["only=single,multi5"])
    assert [c.name for c in r.cells] == ["single", "multi5"]
    # fig3's own default subset (the paper's five cells, ~27 min a seed); only=all: every cell
    five = [c.name for c in load_recipe("fig3").cells]
    assert len(five) == 5 and not any("fullname" in n for n in five)
    every = [c.name for c in load_recipe("fig3", ["only=all"]).cells]
    assert set(five) < set(every) and "single+fullname" in every
    assert [c.name for c in load_recipe("fig3", ["only=single+fullname"]).cells] == \
        ["single+fullname"]


def test_null_for_a_block_the_recipe_sets_restores_its_defaults():
    # fig3's documented paper-scale override: the recipe's pools of 50 -> the paper's pools
    assert load_recipe("fig3").cells[0].world.pools.cities == 50
    cell = load_recipe("fig3", ["world.pools=null", "world.people=30"]).cells[0]
    assert cell.world.pools.cities == 200 and cell.world.pools.companies == 263
    assert cell.world.people == 30 and cell.world.unknown == 50  # the rest of world stays


def test_packing_schedule():
    from factlab.experiments.recipe import packing_segments
    from factlab.experiments.stages import bio_stream
    from factlab.tokens import Schedule, encode_docs, world_tokenizer
    from factlab.corpus import CorpusConfig, make_corpus

    r = load_recipe("quickstart", TINY + ["pretrain.steps=10"])
    r.cells[0].packing = {"whole": 0.7, "named": 0.3}
    cell = r.cells[0].model_validate(r.cells[0].model_dump())
    assert packing_segments(cell.packing, 10) == [("whole", 7), ("named", 3)]
    assert packing_segments("named", 10) == [("named", 10)]
    world = make_corpus(CorpusConfig(people=20, unknown=0))
    tok = world_tokenizer(world, 400)
    s = bio_stream(cell, encode_docs(tok, world.bios()), tok)
    assert isinstance(s, Schedule)
    b = cell.pretrain.batch_size
    whole, named = s.streams
    assert whole.whole and named.mask_head and s.starts[1] == 7 * b
    for bad, msg in [("{whole: 0.7, named: 0.2}", "sum to 1"), ("{whole: 1.0, nope: 0.0}", "unknown"),
                     ("{whole: 0.99, named: 0.01}", "gets no step")]:
        with pytest.raises(FactlabError, match=msg):
            load_recipe("quickstart", TINY + ["pretrain.steps=10", f"packing={bad}"])
    # mixed training: the bio stream gets (1 - qa_ratio) of the rows, so the switch
    # comes at the same fraction of the steps
    mixed = load_recipe("quickstart", TINY + ["pretrain.steps=10", "regime=mixed",
                                              "qa_ratio=0.75", "mix=batch"]).cells[0]
    s = bio_stream(mixed, encode_docs(tok, world.bios()), tok, share=1 - mixed.qa_ratio)
    assert s.starts[1] == round(6 * b * 0.25)
    for key, bad in [("mix", "packed"), ("questions", "[sideways]")]:
        with pytest.raises(FactlabError, match=key):
            load_recipe("quickstart", TINY + [f"{key}={bad}"])


def test_stages_are_configurable_and_a_new_default_field_resumes(tmp_path):
    """A cell runs exactly the stages it names; SHARED follows the cell's fields; a run
    directory resumes when only defaults differ (what the user set is compared)."""
    import yaml

    from factlab.experiments.recipe import SHARED, CellConfig

    assert set(SHARED) == set(CellConfig.model_fields) - {"name"} and "stages" in SHARED
    with pytest.raises(FactlabError, match="unknown stage 'pretrian'"):
        load_recipe("quickstart", TINY + ["stages=[pretrian]"])
    recipe = load_recipe("quickstart", TINY + ["only=single", "stages=[pretrain,extract]"])
    (r,) = run_recipe(recipe, tmp_path, progress=False)
    assert r["stages"] == ["pretrain", "extract"] and "ood" in r
    assert (tmp_path / "single/pretrain/model").is_dir()
    assert not (tmp_path / "single/finetune").exists()  # no finetune stage ran
    assert "## OOD QA accuracy" in (tmp_path / "report.md").read_text()
    # an older run directory (only recipe.yaml, without a field this version added)
    (tmp_path / "recipe.set.json").unlink()
    old = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    del old["cells"][0]["model"]["gradient_checkpointing"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    again = run_recipe(recipe, tmp_path, progress=False)
    assert again[0]["ood"] == r["ood"]
    with pytest.raises(FactlabError, match="different recipe"):
        run_recipe(load_recipe("quickstart", TINY + ["only=single", "stages=[pretrain,extract]",
                                                     "eval.batch_size=7"]), tmp_path)


def test_model_dtype_and_gradient_checkpointing_are_settable(tmp_path):
    import torch

    from factlab.experiments.run import prepare_model
    from factlab.model.build import build_model
    from factlab.tokens.tokenizer import world_tokenizer
    from factlab.corpus import make_corpus

    recipe = load_recipe("quickstart", TINY + ["model.dtype=bf16", "model.gradient_checkpointing=true"])
    cell = recipe.cells[0]
    tok = world_tokenizer(make_corpus(cell.world), 400)
    m = prepare_model(cell, tok)
    on = getattr(m, "is_activation_checkpointing", None)  # transformers >= 5's name
    assert next(m.parameters()).dtype == torch.bfloat16
    assert on if on is not None else m.is_gradient_checkpointing
    build_model("gpt2-rope", "tiny", len(tok), 64, bos_id=tok.eos_token_id, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, seed=0).save_pretrained(tmp_path / "m")
    cell2 = load_recipe("quickstart", TINY + [f"model.path={tmp_path / 'm'}", "model.dtype=bf16"]).cells[0]
    assert next(prepare_model(cell2, tok).parameters()).dtype == torch.bfloat16
    with pytest.raises(FactlabError, match="model.dtype"):
        load_recipe("quickstart", ["model.dtype=fp8"])


def test_the_report_of_a_user_fact_world_has_no_paper_column(tmp_path):
    from factlab.experiments.report import extraction_section

    f = tmp_path / "f.csv"
    f.write_text("entity,attribute,value\nA Tower,city,Paris\nB Bridge,city,Rome\n")

    def fake(cell, aug):
        m = {"exact_match": 0.5, "per_attribute": {"city": 0.5}}
        return {"cell": cell, "regime": "pretrain+finetune", "augment": aug, "ood": m, "id": m,
                "id_paraphrase": m, "loss": {"pretrain": [[10, 1.0]]},
                "tokens_per_s": {"pretrain": 1.0}, "people": 2, "params": 10, "seconds": 1.0,
                "curves": {}}

    for facts, paper in ((None, True), (str(f), False)):
        recipe = load_recipe("quickstart", TINY + ([f"world.facts={facts}"] if facts else []))
        cells = {c.name: c for c in recipe.cells}
        text = "\n".join(extraction_section(tmp_path, recipe, [fake("single", "single"),
                                                                fake("multi5+permute",
                                                                     "multi5+permute")], cells))
        assert ("paper mean" in text and "9.7" in text) == paper
        assert ("no paper numbers" in text) == (not paper)
        if not paper:
            assert "(paper " not in text


def test_the_memory_stage_stores_new_facts_on_the_cells_model(tmp_path):
    """``memory:`` adds the memory stage after extraction: new facts on the cell's
    finetuned model, every one recalled, the model's own answers unchanged, a report
    section; a rerun reads the finished stage instead of tuning again."""
    mem = ["memory.facts=16", "memory.n_keys=32", "memory.topk=4", "memory.key_dim=16",
           "memory.locality_per_set=20", "memory.max_exposures=600"]
    recipe = load_recipe("quickstart", TINY + ["only=multi5+permute", "pretrain.steps=150",
                                               "finetune.steps=40"]
                         + mem)
    assert recipe.cells[0].stage_list() == ["pretrain", "finetune", "extract", "memory"]
    (r,) = run_recipe(recipe, tmp_path, progress=False)
    m = r["memory"]
    assert m["facts"] == 16 and m["recall"] == 1.0 and m["bank_zeroed"] == 0.0
    assert m["unchanged"] == {"own": 1.0, "never_stored": 1.0, "stored_entities": 1.0}
    assert m["held_out_after"] == m["held_out_before"]
    res = json.loads((tmp_path / "multi5+permute/memory/results.json").read_text())
    assert res["model"].endswith("finetune/model")  # the cell's last trained model
    assert "## Memory tuning" in (tmp_path / "report.md").read_text()
    stamp = (tmp_path / "multi5+permute/memory/results.json").stat().st_mtime_ns
    again = run_recipe(recipe, tmp_path, progress=False)
    assert again[0]["memory"] == m
    assert (tmp_path / "multi5+permute/memory/results.json").stat().st_mtime_ns == stamp
    with pytest.raises(FactlabError, match="memory"):
        load_recipe("quickstart", TINY + ["memory.bogus=1"])
