"""The reproduction table: built from run directories, means and spreads over seeds, the
Figure 3 ordering check, and a clear error for a directory that is not a run."""

import json

import numpy as np
import pytest
import yaml

from factlab.errors import FactlabError
from factlab.experiments.recipe import load_recipe
from factlab.experiments.reproduction import load_run, reproduction_lines


def _run(tmp_path, name, recipe, seed, ood: dict, extra=None, overrides=()):
    r = load_recipe(recipe, [f"world.seed={seed}", f"pretrain.seed={seed}", *overrides])
    d = tmp_path / name
    d.mkdir()
    (d / "recipe.yaml").write_text(yaml.safe_dump(r.model_dump(mode="json")))
    results = []
    for c in r.cells:
        if c.name not in ood:
            continue
        res = {"cell": c.name, "regime": c.regime, "augment": c.world.augment,
               "people": 400, "params": 1_300_000, "seconds": 60.0,
               "ood": {"exact_match": ood[c.name], "per_attribute": {}},
               "id": {"exact_match": 1.0}, "id_paraphrase": {"exact_match": 0.5},
               "curves": {"pretrain": [{"step": 10, "eval/bio_first_token/test": 0.95}]},
               "loss": {}, "tokens_per_s": {}}
        res.update((extra or {}).get(c.name, {}))
        results.append(res)
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_table_has_means_spreads_and_the_ordering(tmp_path):
    a = _run(tmp_path, "s0", "fig3", 0, {"single": 0.10, "multi5": 0.30,
                                          "single+permute5": 0.28, "multi5+permute": 0.84})
    b = _run(tmp_path, "s1", "fig3", 1, {"single": 0.12, "multi5": 0.36,
                                          "single+permute5": 0.30, "multi5+permute": 0.80})
    inv = {"name-first": {"ood_inverse": {"exact_match": 0.0}},
           "name-last": {"ood_inverse": {"exact_match": 0.5}}}
    c = _run(tmp_path, "rev", "reverse", 0, {"name-first": 0.8, "name-last": 0.1}, inv)
    text = "\n".join(reproduction_lines([load_run(a), load_run(b), load_run(c)]))
    # single: mean 11.0, half-range 1.0, both seeds listed, paper 9.7
    assert "| single | 9.7 | **11.0 ± 1.0** | 10.0 (seed 0/0), 12.0 (seed 1/1) | 95.0 ± 0.0 |" \
        in text
    # multi5 (paper 41) above single+permute5 (paper 70) on the mean: a strict pair broken
    row = next(ln for ln in text.splitlines()
               if ln.startswith("| multi5 (41.0) | single+permute5 (70.0)"))
    assert "strict" in row and "**no**" in row and "-4.0" in row
    row = next(ln for ln in text.splitlines()
               if ln.startswith("| single (9.7) | multi5+permute (96.6)"))
    assert "strict" in row and "| yes |" in row
    # multi5+permute 82 vs paper 96.6 (>10 points), bios memorised >= 90%: the scale
    assert "scale: 400 people (paper 100,000)" in text
    assert "| name-last | multi5+permute+reverse | works" in text and "**50.0**" in text
    assert "Not run here: `mixed`, `celebrity`, `capacity`." in text
    # pretraining tokens: 5,000 steps x 8 rows x context 128; the paper's 80,000 x 96 x 512
    assert "`s0` | fig3 | 4 | 400 | 1,300,000 | 5000 × 8 | 5.1M |" in text
    assert "(3.93B tokens)" in text


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FactlabError, match="not a finished run directory"):
        load_run(tmp_path)


def test_capacity_runs_enter_the_table(tmp_path):
    cap = {"w32L4-N1000-x100": {"capacity": {
        "people": 1500, "params": 23_000, "non_embedding_params": 12_000, "exposures": 100,
        "bits": 10_000.0, "entropy_bits": 70_000.0, "fraction": 1 / 7,
        "bits_per_param": 10_000 / 23_000, "bios_per_row": 1.0, "clean_context": True}}}
    d = _run(tmp_path, "cap", "capacity", 0, {"w32L4-N1000-x100": 0.0}, cap)
    text = "\n".join(reproduction_lines([load_run(d)]))
    assert "## Knowledge capacity (Part 3.3" in text
    assert "| cap / w32L4-N1000-x100 | 1,500 | 23,000 (12,000) | 100 | 10,000 | 70,000 | " \
        "14.3% | **0.435** | ≈ 1 (100 exposures) | unknown |" in text
    # a result without the optimiser's rows a step and rate gets them from the run's recipe
    pre = load_recipe("capacity", ["only=w32L4-N1000-x100"]).cells[0].pretrain
    assert f"| unknown | {pre.batch_size} × {pre.lr:g} |" in text
    assert "counted one bio per row" not in text
    assert "`capacity`" not in text.split("Not run here:")[1].splitlines()[0]
    assert "| 192 |" in text and "| – | 192 |" in text  # capacity cells have no finetune
    # a copy of the recipe under another name is a run of it
    copy = _run(tmp_path, "cap-copy", "capacity", 0, {"w32L4-N1000-x100": 0.0}, cap,
                overrides=["name=capacity-lr"])
    text = "\n".join(reproduction_lines([load_run(copy)]))
    assert "`capacity`" not in text.split("Not run here:")[1].splitlines()[0]
    # results from before people_series: the run's recipe gives it, so the 1,000- and
    # 2,000-person cells of one model at 100 exposures are neighbours over people
    def old(people, bits):
        return {"capacity": {"people": people, "params": 116_416,
                             "non_embedding_params": 83_648, "exposures": 100,
                             "bits": bits, "entropy_bits": 46.6 * people,
                             "fraction": bits / (46.6 * people), "bits_per_param": 0.0}}
    both = _run(tmp_path, "cap-both", "capacity", 0,
                {"w32L4-N1000-x100": 0.0, "w32L4-N2000-x100": 0.0},
                {"w32L4-N1000-x100": old(1000, 10_000.0),
                 "w32L4-N2000-x100": old(2000, 20_000.0)})
    text = "\n".join(reproduction_lines([load_run(both)]))
    assert "| below capacity (more people stored more) |" in text
    assert "| still rising with people |" in text
    # two seeds of one point, run apart, whose stored keys (the rule before seeds were
    # left out) differ: the recipe's keys pool them, and their mean (15,000) is within 5%
    # of the 2,000-person world's 15,500 -- judged alone, the 10,000-bit seed would read
    # "more people stored more"
    def keyed(people, bits, stale):
        res = old(people, bits)
        res["capacity"].update(series=stale, people_series=stale)
        return res
    s0 = _run(tmp_path, "cap-s0", "capacity", 0,
              {"w32L4-N1000-x100": 0.0, "w32L4-N2000-x100": 0.0},
              {"w32L4-N1000-x100": keyed(1000, 20_000.0, "seed0"),
               "w32L4-N2000-x100": keyed(2000, 15_500.0, "seed0")})
    s1 = _run(tmp_path, "cap-s1", "capacity", 1, {"w32L4-N1000-x100": 0.0},
              {"w32L4-N1000-x100": keyed(1000, 10_000.0, "seed1")})
    text = "\n".join(reproduction_lines([load_run(s0), load_run(s1)]))
    runs, pooled = text.split("Each point, its runs pooled")
    assert runs.count("| at capacity for its exposures |") == 3, text
    # the points table: the two seeds as one point, their mean and half-range
    # (results from before the stage counted the bios a row holds, and no world to
    # recount them from: their exposures are marked)
    assert "| 2 | 1,000 | 116,416 | 100† | **15,000**‡ ± 5,000 | 20,000, 10,000 |" in pooled
    assert pooled.count("| at capacity for its exposures |") == 2
    assert "† exposures counted one bio per row" in runs
    # with the cell's world and tokenizer still in the run, such a result is recounted:
    # at context 192 a whole-packed row holds more than one of these ~90-token bios
    from factlab.experiments.run import prepare_tokenizer, prepare_world

    cell = load_recipe("capacity", ["only=w32L4-N1000-x100"]).cells[0]
    cell = cell.model_copy(update={"world": cell.world.model_copy(update={"people": 30})})
    kept = _run(tmp_path, "cap-kept", "capacity", 0, {"w32L4-N1000-x100": 0.0},
                {"w32L4-N1000-x100": old(1000, 10_000.0)})
    prepare_tokenizer(cell, kept / cell.name, prepare_world(cell, kept / cell.name))
    text = "\n".join(reproduction_lines([load_run(kept)]))
    row = next(ln for ln in text.splitlines() if ln.startswith("| cap-kept / "))
    exposures = float(row.split(" | ")[3])
    # the recipe's 930 steps x 64 rows over the 30 people of the world left in the run
    assert 930 * 64 / 30 * 1.3 < exposures < 930 * 64 / 30 * 2.2, row
    assert "counted one bio per row" not in text
    # a run none of whose cells finished is listed, not a crash
    empty = _run(tmp_path, "cap-empty", "capacity", 0, {})
    text = "\n".join(reproduction_lines([load_run(empty)]))
    assert "| `cap-empty` | capacity | 0 | no finished cell of the recipe |" in text


def _probe(kind, tasks, head="tied"):
    return {"kind": kind, "positions": ["p1", "p2"] if kind == "p" else ["name"],
            "tasks": tasks, "split": {"train": 200, "test": 200},
            "probe": {"head": head}, "train": {"steps": 400}}


def test_probe_rows_p1_contrast_and_q_with_paper(tmp_path):
    def t(attr, target, test, chance, own=None, share=(0.2, 0.2)):
        return {"name": f"{attr}/{target}", "attribute": attr, "target": target,
                "test": test, "chance": chance, "own": own, "own_share": list(share)}
    p = {"single": _probe("p", [t("birth_date", "month", [0.9, 0.2], 0.1, 0.9, (1.0, 0.0)),
                                t("major", "first_token", [0.05, 0.1], 0.03, 0.97),
                                t("major", "value", [0.5, 0.5], 0.03, 0.5)]),
         "multi5+permute": _probe("p", [t("birth_date", "month", [0.5, 0.5], 0.1, 0.8),
                                        t("major", "first_token", [0.4, 0.4], 0.03, 0.7)])}
    q = _probe("q", [t("major", "value", [0.11], 0.025), t("major", "first_token", [0.9], 0.1)])
    d = _run(tmp_path, "qs", "quickstart", 0, {"single": 0.12, "multi5+permute": 0.93},
             {c: {"probe": {"p": p[c], **({"q": q} if c == "multi5+permute" else {})}}
              for c in p})
    text = "\n".join(reproduction_lines([load_run(d)]))
    # p1: mean over month + first-token tasks (the value task is left out, and single's
    # birth month, whose own position p1 is), own beside it
    assert "| quickstart / single | 5.0 (3.0) | 97.0 | tied head, 200 probe-train people, " \
           "400 steps | near chance" in text
    assert "| quickstart / multi5+permute | 45.0 (6.5) | 75.0 |" in text
    assert "≈100% from the first position on" in text
    # Q: whole value only, chance in brackets, the paper's number beside it
    row = next(ln for ln in text.splitlines() if ln.startswith("| quickstart / multi5+permute")
               and "OOD" not in ln and "paper 94.9" in ln)
    assert "11.0 (2.5), paper 94.9" in row and "| 93.0 |" in row
    assert "Result 5" in text and "too few for a correlation" in text  # one probed cell


def test_result5_correlates_q_probe_with_qa_across_cells():
    from factlab.experiments.reproduction import _result5

    line = _result5([(3.0, 0.10), (5.0, 0.30), (20.0, 0.90), (None, 0.5)])
    r = np.corrcoef([3.0, 5.0, 20.0], [0.10, 0.30, 0.90])[0, 1]
    assert f"Pearson r = {r:.2f}" in line and "over the 3 probed cells" in line
    assert "Pearson r = -1.00" in _result5([(1.0, 0.9), (2.0, 0.5), (3.0, 0.1)])
    assert "too few" in _result5([(1.0, 0.9), (2.0, 0.5)])


def test_kept_records_regenerate_the_same_table_after_the_runs_are_gone(tmp_path):
    import shutil

    from factlab.experiments.reproduction import write_reproduction

    a = _run(tmp_path, "s0", "fig3", 0, {"single": 0.10, "multi5+permute": 0.84})
    b = _run(tmp_path, "s1", "fig3", 1, {"single": 0.12, "multi5+permute": 0.80})
    (a / "single").mkdir()  # a cell's checkpoints: not part of the record
    (a / "single" / "model.safetensors").write_bytes(b"x" * 1000)
    first = write_reproduction([a, b], tmp_path / "one.md", keep=tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept" / "s0").iterdir()) == \
        ["recipe.yaml", "results.json"]
    shutil.rmtree(a)
    shutil.rmtree(b)
    # regenerated from the records alone, and with a later run added, into the same place
    c = _run(tmp_path, "s2", "fig3", 2, {"single": 0.14, "multi5+permute": 0.82})
    kept = sorted((tmp_path / "kept").iterdir())
    again = write_reproduction(kept, tmp_path / "two.md", keep=tmp_path / "kept")
    assert again.read_text() == first.read_text()
    three = write_reproduction(kept + [c], tmp_path / "three.md", keep=tmp_path / "kept")
    assert "| single | 9.7 | **12.0 ± 2.0** |" in three.read_text()
    assert (tmp_path / "kept" / "s2" / "results.json").is_file()


def test_keep_refuses_two_runs_of_one_name_before_writing(tmp_path):
    from factlab.experiments.reproduction import write_reproduction

    a = _run(tmp_path, "fig3", "fig3", 0, {"single": 0.10})
    (tmp_path / "other").mkdir()
    b = _run(tmp_path / "other", "fig3", "fig3", 1, {"single": 0.12})
    with pytest.raises(FactlabError, match="two runs are named fig3"):
        write_reproduction([a, b], tmp_path / "t.md", keep=tmp_path / "kept")
    assert not (tmp_path / "kept").exists() and not (tmp_path / "t.md").exists()


def test_runs_of_one_cell_at_other_settings_get_their_own_rows(tmp_path):
    """Seeds are averaged; a run of the same cell at another setting is not a seed: it gets
    a row of its own, labelled by what differs, and stays out of the other row's mean. A
    probe stage (which reads the pretrained model, changing nothing) does not split."""
    a = _run(tmp_path, "m0", "mixed", 0, {"qa_r=0.8": 0.12})
    b = _run(tmp_path, "m1", "mixed", 1, {"qa_r=0.8": 0.14}, overrides=["probe.kinds=[q]"])
    c = _run(tmp_path, "mseq", "mixed", 0, {"qa_r=0.8": 0.30}, overrides=["mix=sequence"])
    d = _run(tmp_path, "mlong", "mixed", 0, {"qa_r=0.8": 0.50},
             overrides=["mix=sequence", "pretrain.lr=0.001"])
    text = "\n".join(reproduction_lines([load_run(x) for x in (a, b, c, d)]))
    rows = [ln for ln in text.splitlines() if ln.startswith("| qa_r=0.8")]
    assert len(rows) == 3, rows
    assert rows[0].startswith("| qa_r=0.8 (mix=batch, pretrain.lr=0.0015) | 86.6 | "
                              "**13.0 ± 1.0** | 12.0 (seed 0/0), 14.0 (seed 1/1) |")
    assert rows[1].startswith("| qa_r=0.8 (mix=sequence, pretrain.lr=0.0015) | 86.6 | "
                              "**30.0** | 30.0 (seed 0/0) |")
    assert rows[2].startswith("| qa_r=0.8 (mix=sequence, pretrain.lr=0.001) | 86.6 | **50.0** |")
    # one setting alone: the plain row, as before
    text = "\n".join(reproduction_lines([load_run(a), load_run(b)]))
    assert "| qa_r=0.8 | 86.6 | **13.0 ± 1.0** |" in text


def test_ordering_uses_one_setting_per_cell_and_names_the_others(tmp_path):
    a = _run(tmp_path, "s0", "fig3", 0, {"single": 0.10, "multi5+permute": 0.84})
    b = _run(tmp_path, "long", "fig3", 0, {"single": 0.30, "multi5+permute": 0.20},
             overrides=["pretrain.steps=9000"])
    text = "\n".join(reproduction_lines([load_run(a), load_run(b)]))
    row = next(ln for ln in text.splitlines()
               if ln.startswith("| single (9.7) | multi5+permute (96.6)"))
    assert "+74.0" in row and "| yes |" in row
    assert "left out: single (pretrain.steps=9000), multi5+permute (pretrain.steps=9000)." in text


def test_a_copy_named_after_a_recipe_joins_its_table(tmp_path):
    # a YAML copy of `mixed` renamed mixed-long (another setting) is a run of `mixed`: its
    # cells enter the mixed table beside the recipe's own runs; the scale table keeps
    # the copy's name
    own = _run(tmp_path, "mixed", "mixed", 0, {"qa_r=0.8": 0.11})
    copy = _run(tmp_path, "mixed-long", "mixed", 0, {"qa_r=0.8": 0.16},
                overrides=["name=mixed-long", "pretrain.weight_decay=0.3",
                           "pretrain.eval_every=777", "pretrain.log_every=33"])
    text = "\n".join(reproduction_lines([load_run(own), load_run(copy)]))
    mixed = text.split("## Mixed training")[1].split("\n## ")[0]
    assert "**11.0**" in mixed and "**16.0**" in mixed, mixed
    # how often a run evaluates or logs is no setting of the experiment
    assert "qa_r=0.8 (pretrain.weight_decay=0.3) |" in mixed, mixed
    assert "| `mixed-long` | mixed-long | 1 |" in text
    assert "`mixed`" not in text.split("Not run here:")[1].splitlines()[0]
