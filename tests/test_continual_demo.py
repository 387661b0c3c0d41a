"""The CPU demonstration of continual learning (slow: the quickstart's multi5+permute
cell, then `factlab run continual` over it, ~13 minutes on 2 cores).

The floors are the README's statement of what the demonstration shows (measured on
2026-12-02: learning accuracy 90-95% for every method; base world 92% -> 30% sequential,
79% replay and joint): every method learns each experience, sequential finetuning loses
most of the base world, and replay and joint training keep most of it."""

import pytest


@pytest.mark.slow
def test_continual_demonstration(tmp_path):
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.run import run_recipe

    run_recipe(load_recipe("quickstart", ["only=multi5+permute"]), tmp_path / "qs",
               progress=False)
    from factlab.experiments.continual import ContinualSettings, run_continual

    res = run_continual(ContinualSettings(base=str(tmp_path / "qs" / "multi5+permute")),
                        tmp_path / "continual", progress=False)
    by = {m["method"]: m["summary"] for m in res["methods"]}
    for m, s in by.items():
        assert s["matrix_summary"]["learning_accuracy"] >= 0.8, m
    base = {m: s["matrix"][-1][0] for m, s in by.items()}
    before = by["sequential"]["matrix"][0][0]
    assert before >= 0.85
    assert base["sequential"] < 0.4 < 0.65 < base["replay"]
    assert base["joint"] > 0.65
    assert by["sequential"]["ckl"]["update_success"] >= 0.8
