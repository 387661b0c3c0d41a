"""The Part 3.1 central effect at CPU scale (slow: the whole quickstart, ~10 minutes on 2
cores): bios of the same people are memorised either way, but only a model pretrained on
multi5+permute bios answers questions about people whose QA it never saw."""

import pytest

from factlab.experiments.recipe import load_recipe
from factlab.experiments.report import bio_memorised
from factlab.experiments.run import run_recipe


# Measured (README, 'Status'; docs/extraction.md): 93.4% multi5+permute vs 12.5% single
# OOD, bios 99.3% / 100% memorised. The asserted levels are the targets.
@pytest.mark.slow
def test_multi5_permute_extracts_better_than_single(tmp_path):
    results = {r["cell"]: r for r in run_recipe(load_recipe("quickstart"), tmp_path,
                                                progress=False)}
    single, m5p = results["single"], results["multi5+permute"]
    assert bio_memorised(m5p) >= 0.9  # memorised: what follows is extraction, not recall
    assert bio_memorised(single) >= 0.9
    assert m5p["ood"]["exact_match"] >= 0.9
    assert single["ood"]["exact_match"] <= 0.15
