"""Each shipped recipe's effect at its own (CPU) scale. Slow: each runs the whole recipe
(the README's "Recipes at CPU scale" table says how long); whoever changes a recipe runs
its test and puts the result in the note. Measured numbers: docs/extraction.md."""

import pytest

from factlab.experiments.recipe import load_recipe
from factlab.experiments.report import bio_memorised
from factlab.experiments.run import run_recipe


def _run(tmp_path, name, overrides=()):
    return {r["cell"]: r for r in run_recipe(load_recipe(name, list(overrides)), tmp_path,
                                             progress=False)}


def _ood(r):
    return r["ood"]["exact_match"]


# seed 0 at the recipe's 5,000 steps, 2026-12-04 (OOD %): single 11.3, single+permute1 11.4,
# multi5 27.1, single+permute5 33.2, multi5+permute 94.1; every cell's bios >= 99.6%
# memorised (at 2,500 steps multi5 31.0 and single+permute5 28.1 were in the wrong order)
@pytest.mark.slow
def test_fig3_augmentation_makes_knowledge_extractable(tmp_path):
    res = _run(tmp_path, "fig3")  # its default: the paper's five cells
    assert len(res) == 5
    for r in res.values():
        assert bio_memorised(r) >= 0.9, r["cell"]  # extraction, not recall, is measured
    single, p1, p5, m5, m5p = (_ood(res[k]) for k in (
        "single", "single+permute1", "single+permute5", "multi5", "multi5+permute"))
    assert single <= 0.2 and p1 <= 0.2
    assert m5 >= single + 0.1 and p5 >= single + 0.1  # any augmentation helps
    assert m5p >= 0.7 and m5p >= max(m5, p5) + 0.3  # both together help most
    assert p5 > m5  # the paper: permute alone (70%) beats multi5 alone (41%)


# Measured 2026-12-02 (400 people, every cell 2,500 bio batches): pretrain + finetune
# 10.2%, mixed QA_r 0.5 13.3%, QA_r 0.8 10.5% (ID 100%: P_train's answers memorised as
# facts of their own). The paper's effect (86.6% vs 9.7%) does not show at this scale.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="mixed training does not beat pretrain + finetune "
                   "at 400 people (measured 10.5% vs 10.2%); docs/extraction.md")
def test_mixed_training_beats_pretrain_then_finetune(tmp_path):
    res = _run(tmp_path, "mixed")
    assert _ood(res["qa_r=0.8"]) >= _ood(res["pretrain+finetune"]) + 0.2


# seed 0, 2026-12-07 (5,000 pretraining steps, 10.6 min): the minority's OOD 11.6% alone
# vs 25.3% with celebrities (seed 1: 11.9% vs 28.1%; paper 4.4% -> 86.8%); minority bios
# 100% memorised in both. The direction, a sixth of the paper's lift.
@pytest.mark.slow
def test_celebrities_help_the_minority(tmp_path):
    res = _run(tmp_path, "celebrity")
    alone, helped = res["minority-alone"], res["with-celebrities"]
    assert bio_memorised(alone) >= 0.9 and bio_memorised(helped) >= 0.9
    assert _ood(helped) >= _ood(alone) + 0.05


# seed 0, 2026-12-02 (10 min): inverse OOD 0.0% name-first vs 48.5% name-last; forward
# OOD the mirror image, 82.5% vs 3.0% (Part 3.2: knowledge is stored in the direction
# it is written)
@pytest.mark.slow
def test_inverse_search_needs_the_name_written_last(tmp_path):
    res = _run(tmp_path, "reverse")
    first, last = res["name-first"], res["name-last"]
    assert first["ood_inverse"]["exact_match"] <= 0.05
    assert last["ood_inverse"]["exact_match"] >= 0.3
    assert _ood(first) >= 0.7 and _ood(last) <= 0.1


# seed 0, 2026-12-07 (eighth session; the recipe's cells at 3,720 steps of 16 rows, 100
# exposures as the stage counts them, each value scored where nothing before it gives it
# away): of a 1,000-person world (46,592 bits) the 4-layer width-64 model (331k
# parameters) stores 30,059 bits, the width-32 one (116k) 517 -- bits stored grow with
# parameters (Part 3.3), far faster than the parameter count at this scale (10.4 and 5.3
# min, each on one thread beside another cell). At 64 rows a step (930 steps) the test
# passed with 14,408 and 224 bits (first-bio scores).
@pytest.mark.slow
def test_capacity_bits_stored_grow_with_parameters(tmp_path):
    res = _run(tmp_path, "capacity", ["only=w32L4-N1000-x100,w64L4-N1000-x100"])
    small, big = res["w32L4-N1000-x100"]["capacity"], res["w64L4-N1000-x100"]["capacity"]
    assert big["params"] > 2 * small["params"]
    assert big["bits"] >= 5 * max(small["bits"], 1.0)
    assert big["bits_per_param"] > small["bits_per_param"]
    assert big["bits"] < big["entropy_bits"]
