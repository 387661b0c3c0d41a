"""The CPU demonstration of continual learning (slow: the quickstart's multi5+permute
cell, then `factlab run continual` over it, ~12 minutes on 2 cores).

The floors are the README's statement of what the demonstration shows (measured on
2026-12-02: learning accuracy 87-95% for every method but L2P, 12% for L2P; base world
92% -> 30% sequential and L2P, 79% replay and joint, 88% per-experience adapters):
sequential finetuning loses most of the base world, replay and joint training keep most
of it, the adapter router keeps nearly all of it while learning each experience, and
the prompt pool learns little and still loses the base world."""

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
        if m != "l2p":
            assert s["matrix_summary"]["learning_accuracy"] >= 0.8, m
    assert by["l2p"]["matrix_summary"]["learning_accuracy"] < 0.4
    base = {m: s["matrix"][-1][0] for m, s in by.items()}
    before = by["sequential"]["matrix"][0][0]
    assert before >= 0.85
    assert base["sequential"] < 0.4 < 0.65 < base["replay"]
    assert base["joint"] > 0.65
    assert by["sequential"]["ckl"]["update_success"] >= 0.8
    assert base["adapters"] > 0.8 and base["l2p"] < 0.5
    routing = next(m for m in res["methods"] if m["method"] == "adapters")["routing"]
    assert routing["routing_accuracy_by_label"]["new"] >= 0.95
