"""Part 3.3's bits of knowledge (issue 16 §5): the formula against hand-computed cases."""

import math

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.evaluate.capacity import bits_per_parameter, bits_stored

POOLS = {"birth_city": 200, "university": 300, "company_city": 1}


def test_a_certain_model_stores_the_worlds_entropy_and_one_at_chance_stores_zero():
    n = 50
    certain = bits_stored({a: np.zeros(n) for a in POOLS}, POOLS)
    entropy = n * (math.log2(200) + math.log2(300))  # the derived city adds nothing
    assert certain["bits"] == pytest.approx(entropy) == certain["entropy_bits"]
    assert certain["fraction"] == pytest.approx(1.0)
    chance = bits_stored({a: np.full(n, math.log(d)) for a, d in POOLS.items()}, POOLS)
    assert chance["bits"] == pytest.approx(0.0, abs=1e-9)
    worse = bits_stored({"birth_city": np.full(n, 2 * math.log(200))}, POOLS)
    assert worse["bits"] == 0.0  # worse than chance counts as nothing, not negative


def test_a_hand_computed_case():
    # 2 people, 4 values: one value known (0 nats), one at 1 bit of loss (ln 2 nats):
    # 2 x 2 bits of entropy - 1 bit not known = 3 bits
    r = bits_stored({"a": np.array([0.0, math.log(2)])}, {"a": 4})
    assert r["bits"] == pytest.approx(3.0) and r["attributes"]["a"]["entropy_bits"] == 4.0
    assert bits_per_parameter(r["bits"], 3) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(FactlabError, match="no pool size"):
        bits_stored({"x": np.zeros(2)}, {})
    with pytest.raises(FactlabError, match="finite and >= 0"):
        bits_stored({"a": np.array([np.nan])}, {"a": 4})
    with pytest.raises(FactlabError, match="pool size 0"):
        bits_stored({"a": np.zeros(1)}, {"a": 0})
    with pytest.raises(FactlabError, match="parameters must be >= 1"):
        bits_per_parameter(1.0, 0)


def test_value_spans_cover_exactly_each_value_and_the_nll_is_the_models(tmp_path):
    import torch

    from factlab.corpus import CorpusConfig, make_corpus
    from factlab.evaluate.capacity import pool_sizes, value_nll, value_spans
    from factlab.model.build import build_model
    from factlab.tokens import world_tokenizer

    c = make_corpus(CorpusConfig(people=12, seed=3, unknown=0, augment="single"))
    tok = world_tokenizer(c, vocab_size=600)
    docs = c.bios()
    ex, attr = value_spans(tok, docs)
    assert len(ex) == 12 * 6
    for q in range(len(ex)):
        d, a = int(ex.doc[q]), int(attr[q])
        toks = ex.example(q)[int(ex.answer_start[q]):]
        s, e = docs.spans[d, a]
        assert tok.decode(toks).strip() == docs.text[d][s:e]
    model = build_model("gpt2-rope", "tiny", len(tok), 128, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0).eval()
    nll = value_nll(model, tok, docs, batch_size=5)
    assert set(nll) == set(c.attributes) and all(len(v) == 12 for v in nll.values())
    # by hand for one value: the log-softmax of the full forward at the value's positions
    q = 7
    ids = torch.tensor(ex.example(q), dtype=torch.long)[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    st = int(ex.answer_start[q])
    hand = -sum(float(lp[t - 1, ids[0, t]]) for t in range(st, ids.shape[1]))
    assert nll[c.attributes[int(attr[q])]][q // 6] == pytest.approx(hand, rel=1e-4)
    sizes = pool_sizes(c.world)
    assert sizes["company_city"] == 1 and sizes["birth_city"] == len(c.people.pools[1])


def test_each_value_is_scored_in_the_first_bio_that_does_not_give_it_away():
    from factlab.corpus import CorpusConfig, make_corpus
    from factlab.evaluate.capacity import clean_docs, person_value_nll, pool_sizes, value_nll
    from factlab.model.build import build_model
    from factlab.text.documents import Docs
    from factlab.tokens import world_tokenizer

    c = make_corpus(CorpusConfig(people=12, seed=3, unknown=0, augment="multi5+permute"))
    tok = world_tokenizer(c, vocab_size=600)
    docs = c.bios()
    model = build_model("gpt2-rope", "tiny", len(tok), 256, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0).eval()
    sizes = pool_sizes(c.world)
    got = person_value_nll(model, tok, docs, sizes, c.world.derived, batch_size=7)
    pick = clean_docs(docs, c.world.derived)
    emp, city = c.attributes.index("employer"), c.attributes.index("company_city")
    first = pick[c.attributes.index("major")]  # no follower: each person's first bio
    assert (np.asarray(docs.entry)[first] == 0).all()
    # the employer: never in a bio that names its company city first, and for some people
    # not their first bio (a permuted bio puts the city first about half the time)
    chosen = pick[emp][pick[emp] >= 0]
    assert (docs.spans[chosen, city, 0] > docs.spans[chosen, emp, 0]).all()
    assert (pick[emp] != first).any()
    # each person's number is the model's loss on the value in the chosen bio, and chance
    # (no bits) for a person without one
    for k in (emp, c.attributes.index("major")):
        for p, d in enumerate(pick[k]):
            want = (math.log(sizes[c.attributes[k]]) if d < 0 else value_nll(
                model, tok, Docs([docs.text[d]], docs.person[[d]], docs.entry[[d]],
                                 docs.spans[[d]], docs.attributes))[c.attributes[k]][0])
            assert got[c.attributes[k]][p] == pytest.approx(want, rel=1e-5)


def test_the_capacity_stage_counts_exposures_and_the_worlds_entropy(tmp_path):
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.run import run_recipe

    r = load_recipe("capacity", ["parallel=1", "only=w32L4-N1000-x100"])
    cell = r.cells[0].model_copy(update={
        "world": r.cells[0].world.model_copy(update={"people": 20}),
        "pretrain": r.cells[0].pretrain.model_copy(update={"steps": 10, "batch_size": 64})})
    r.cells = [cell]
    res = run_recipe(r, tmp_path, progress=False)[0]["capacity"]
    # exposures: the bios in the rows pretraining read, counted here from the stream's own
    # rows (their EOS tokens); at context 192 a whole-packed row holds more than one ~90-
    # token bio, so rows / people (what the stage counted until 2026-12-07) is too low
    from factlab.corpus import load_world
    from factlab.experiments.stages import bio_stream
    from factlab.tokens.encode import encode_docs
    from factlab.tokens.tokenizer import load_tokenizer

    cdir = next(p.parent.parent for p in tmp_path.rglob("world/manifest.json"))
    tok = load_tokenizer(cdir / "tokenizer")
    batch = bio_stream(cell, encode_docs(tok, load_world(cdir / "world").bios()), tok) \
        .sequences(0, 10 * 64)
    bios_read = int((batch["input_ids"] == tok.eos_token_id).sum())
    assert res["people"] == 20 and res["rows"] == 10 * 64 and bios_read > 10 * 64
    assert res["exposures"] == pytest.approx(bios_read / 20, rel=0.02)
    assert res["bios_per_row"] == pytest.approx(bios_read / (10 * 64), rel=0.02)
    sizes = {"birth_date": 12 * 28 * 200}  # every person's entropy, summed by hand
    per_person = math.log2(sizes["birth_date"]) + math.log2(200) + math.log2(300) + \
        math.log2(100) + math.log2(263)  # company city follows the employer: 0 bits
    assert res["entropy_bits"] == pytest.approx(20 * per_person)
    assert 0 <= res["bits"] <= res["entropy_bits"]
    assert res["bits_per_param"] == pytest.approx(res["bits"] / res["params"])
    # the keys that place it among its neighbours over exposures and over world sizes
    from factlab.experiments.stages import capacity_series

    # the optimiser's rows a step and rate, and the values scored where no follower
    # gives them away (clean_docs)
    assert res["batch_size"] == 64 and res["lr"] == cell.pretrain.lr and res["clean_context"]
    assert res["series"] == capacity_series(cell)
    assert res["people_series"] == capacity_series(cell, over="people") != res["series"]
    assert (tmp_path / "capacity.png").is_file()
    assert "Knowledge capacity" in (tmp_path / "report.md").read_text()


def _cap(cell, bits, exposures, people=1500, params=23_000, entropy=70_000.0, series=None,
         people_series=None, rows=None):
    k = {"people": people, "params": params, "non_embedding_params": params // 2,
         "exposures": exposures, "bits": bits, "entropy_bits": entropy,
         "fraction": bits / entropy, "bits_per_param": bits / params, "series": series,
         "people_series": people_series, "clean_context": True}
    return {"cell": cell, "capacity": k | ({"rows": rows} if rows else {})}


def _at(cell, bits, people, exposures=100, ps="m", entropy=None):
    """A 100-exposure point of one series over people (people_series ``ps``)."""
    return _cap(cell, bits, exposures, people=people, series=f"s{people}",
                people_series=ps, entropy=entropy or 47.0 * people)


def test_a_series_is_the_same_training_but_for_its_length():
    from factlab.experiments.capacity_report import saturation
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.stages import capacity_series

    cell = load_recipe("capacity", ["only=w32L4-N1000-x100"]).cells[0]
    longer = cell.model_copy(update={"pretrain": cell.pretrain.model_copy(
        update={"steps": 9999, "log_every": 7})})
    faster = cell.model_copy(update={"pretrain": cell.pretrain.model_copy(
        update={"lr": cell.pretrain.lr * 2})})
    assert capacity_series(longer) == capacity_series(cell) != capacity_series(faster)
    # two learning rates at the same size and world are two series: the second's extra
    # bits are not "more exposures raised it", nor its equal bits a saturation
    rows = [_cap("slow-x100", 10_000, 100, series="s"), _cap("fast-x100", 20_000, 100,
                                                               series="f"),
            _cap("fast-x300", 20_500, 300, series="f")]
    assert saturation(rows) == {"slow-x100": "unknown", "fast-x100": "saturated",
                                "fast-x300": "saturated"}
    # a rerun at the same exposure count is no evidence of saturation
    rows = [_cap("a", 10_000, 100, series="s"), _cap("a-again", 10_100, 100, series="s")]
    assert saturation(rows) == {"a": "unknown", "a-again": "unknown"}
    # over world sizes: the people and the steps differ, the rest is one series
    bigger = cell.model_copy(update={
        "world": cell.world.model_copy(update={"people": cell.world.people * 8}),
        "pretrain": cell.pretrain.model_copy(update={"steps": cell.pretrain.steps * 8})})
    assert capacity_series(bigger, over="people") == capacity_series(cell, over="people")
    assert capacity_series(bigger) != capacity_series(cell)
    assert capacity_series(faster, over="people") != capacity_series(cell, over="people")
    # another seed (the world's draw, the run's) is another measurement of the same point
    reseeded = cell.model_copy(update={
        "world": cell.world.model_copy(update={"seed": 1}),
        "pretrain": cell.pretrain.model_copy(update={"seed": 1})})
    for over in ("exposures", "people"):
        assert capacity_series(reseeded, over=over) == capacity_series(cell, over=over)


def test_runs_at_other_seeds_are_pooled_into_one_point():
    from factlab.experiments.capacity_report import saturation

    # two seeds of the 2,000-person world scatter by 22% (measured 2026-12-07); their
    # mean is within 5% of the 8,000-person world's bits, so the whole series is at its
    # capacity -- judged run by run, the low seed would read "more people stored more"
    rows = [_at("n2k-s0", 71_662, 2000), _at("n2k-s1", 56_188, 2000), _at("n8k", 66_000, 8000)]
    assert saturation(rows) == {"n2k-s0": "at capacity for its exposures",
                                "n2k-s1": "at capacity for its exposures",
                                "n8k": "at capacity for its exposures"}
    # the measured series (2026-12-07): seeds 0 and 1 at 2,000 and 4,000 people, seed 0 at
    # 8,000; pooled, each doubling of the world stores 7-8% more: still rising
    rows = [_at("n2k-s0", 71_662, 2000), _at("n2k-s1", 56_188, 2000),
            _at("n4k-s0", 65_955, 4000), _at("n4k-s1", 71_804, 4000), _at("n8k", 73_933, 8000)]
    more = "below capacity (more people stored more)"
    assert saturation(rows) == {"n2k-s0": more, "n2k-s1": more, "n4k-s0": more,
                                "n4k-s1": more, "n8k": "still rising with people"}
    # and the mean decides the other way too: a larger world above the pooled point
    rows = [_at("n2k-s0", 60_000, 2000), _at("n2k-s1", 62_000, 2000), _at("n8k", 70_000, 8000)]
    assert saturation(rows) == {"n2k-s0": "below capacity (more people stored more)",
                                "n2k-s1": "below capacity (more people stored more)",
                                "n8k": "still rising with people"}
    # seeds of one length read different numbers of bios (a world's draw sets the bios'
    # lengths, so how many a whole-packed row holds): the measured 4,000-person points
    # (2026-12-07), pooled by their rows, not split by their exposures
    def x(cell, bits, exposures, rows):
        return _cap(cell, bits, exposures, people=4000, series="s", entropy=186_366.0,
                    rows=rows)

    rows = [x("x167-s0", 65_955, 166.7, 400_000), x("x167-s1", 71_804, 166.3, 400_000),
            x("x333-s0", 122_914, 333.3, 800_000), x("x333-s1", 134_992, 332.6, 800_000)]
    assert saturation(rows) == {"x167-s0": "below capacity", "x167-s1": "below capacity",
                                "x333-s0": "still rising", "x333-s1": "still rising"}
    from factlab.experiments.capacity_report import points

    assert [[r["cell"] for r in rs] for rs in points(rows)] == [["x167-s0", "x167-s1"],
                                                                ["x333-s0", "x333-s1"]]
    # and over people: seeds and world sizes at the same rows per person are one level
    rows = [_cap("n2k-s0", 60_000, 166.5, people=2000, series="a", people_series="m",
                 rows=200_000, entropy=94_000.0),
            _cap("n2k-s1", 62_000, 168.0, people=2000, series="a", people_series="m",
                 rows=200_000, entropy=94_000.0),
            _cap("n8k", 61_000, 167.8, people=8000, series="b", people_series="m",
                 rows=800_000, entropy=373_000.0)]
    assert set(saturation(rows).values()) == {"at capacity for its exposures"}
    # over exposures the same: seeds of the 100-exposure point pooled
    rows = [_cap("x100-s0", 10_000, 100, series="s"), _cap("x100-s1", 12_000, 100, series="s"),
            _cap("x300", 11_300, 300, series="s")]
    assert saturation(rows) == {"x100-s0": "saturated", "x100-s1": "saturated",
                                "x300": "saturated"}


def test_capacity_at_a_number_of_exposures_is_reached_when_more_people_store_no_more():
    from factlab.experiments.capacity_report import capacity_table, saturation

    # 1,000 -> 2,000 people at 100 exposures doubled the bits (the smaller world held the
    # model back); 8,000 stored within 5% of 2,000's: that is the model's capacity there
    rows = [_at("n1k", 38_000, 1000), _at("n2k", 71_000, 2000), _at("n8k", 73_000, 8000)]
    assert saturation(rows) == {"n1k": "below capacity (more people stored more)",
                                "n2k": "at capacity for its exposures",
                                "n8k": "at capacity for its exposures"}
    # a low middle point (seed 0's measured bits): it is below what 8,000 stored, and does
    # not make 8,000 "rising" (8,000 is within 5% of the best before it, 2,000's)
    rows = [_at("n1k", 38_274, 1000), _at("n2k", 71_662, 2000), _at("n4k", 65_955, 4000),
            _at("n8k", 73_933, 8000)]
    assert saturation(rows) == {"n1k": "below capacity (more people stored more)",
                                "n2k": "at capacity for its exposures",
                                "n4k": "below capacity (more people stored more)",
                                "n8k": "at capacity for its exposures"}
    # still rising with people: nothing says capacity
    rows = [_at("n1k", 38_000, 1000), _at("n2k", 71_000, 2000), _at("n8k", 150_000, 8000)]
    assert saturation(rows) == {"n1k": "below capacity (more people stored more)",
                                "n2k": "below capacity (more people stored more)",
                                "n8k": "still rising with people"}
    # another model (another people series) or another exposure count is not a neighbour
    rows = [_at("n2k", 71_000, 2000), _at("n8k", 73_000, 8000, ps="other")]
    assert saturation(rows) == {"n2k": "unknown", "n8k": "unknown"}
    rows = [_at("n2k", 71_000, 2000), _at("n8k-x300", 73_000, 8000, exposures=300)]
    assert saturation(rows) == {"n2k": "unknown", "n8k-x300": "unknown"}
    # more exposures storing more outranks a plateau over people: the model could hold
    # more, just not at 100 exposures
    rows = [_at("n2k", 71_000, 2000), _at("n8k", 73_000, 8000),
            _cap("n8k-x300", 120_000, 300, people=8000, series="s8000", people_series="m",
                 entropy=47.0 * 8000)]
    got = saturation(rows)
    assert got["n8k"] == "below capacity" and got["n2k"] == "at capacity for its exposures"
    text = "\n".join(capacity_table([_at("n1k", 38_000, 1000), _at("n2k", 71_000, 2000),
                                     _at("n8k", 73_000, 8000)]))
    assert "| at capacity for its exposures |" in text


def test_saturation_labels_each_point_from_its_neighbours_in_exposures():
    from factlab.experiments.capacity_report import capacity_table, saturation

    # 10k -> 20k (more than 5% more: the first is below capacity) -> 20.5k (within 5%:
    # saturated, and so is the 20k point that more exposures did not raise)
    rows = [_cap("c", 20_500, 1000), _cap("a", 10_000, 100), _cap("b", 20_000, 300)]
    assert saturation(rows) == {"a": "below capacity", "b": "saturated", "c": "saturated"}
    # still rising at the most exposures
    rows = [_cap("a", 10_000, 100), _cap("b", 20_000, 300), _cap("c", 30_000, 1000)]
    assert saturation(rows) == {"a": "below capacity", "b": "below capacity",
                                "c": "still rising"}
    # a model that stores > 90% of its world is limited by the world; a different model
    # size is its own group, and alone it is unknown
    rows = [_cap("w", 66_000, 100), _cap("w2", 67_000, 300), _cap("big", 5_000, 100,
                                                                   params=91_000)]
    assert saturation(rows) == {"w": "world-limited", "w2": "world-limited",
                                "big": "unknown"}
    # zero bits is not a capacity, even when more exposures also stored zero
    rows = [_cap("a", 0.0, 100), _cap("b", 0.0, 300), _cap("c", 152.0, 1000)]
    assert saturation(rows) == {"a": "below capacity", "b": "below capacity",
                                "c": "still rising"}
    rows = [_cap("a", 0.0, 100), _cap("b", 0.0, 300)]
    assert saturation(rows) == {"a": "nothing stored", "b": "nothing stored"}
    text = "\n".join(capacity_table([_cap("a", 10_000, 100), _cap("b", 20_000, 1000)]))
    assert "| a | 1,500 | 23,000 (11,500) | 100 | 10,000 |" in text
    assert "≈ 1 (100 exposures) | below capacity |" in text
    assert "‡" not in text
    # bits scored in the first bio (before the stage looked for a clean one) are marked
    old = _cap("a", 10_000, 100)
    del old["capacity"]["clean_context"]
    text = "\n".join(capacity_table([old, _cap("b", 20_000, 1000)]))
    assert "| a | 1,500 | 23,000 (11,500) | 100 | 10,000‡ |" in text
    assert "| 20,000 |" in text and "‡ values scored in each person's first bio" in text
    assert "≈ 2 (1,000 exposures) | still rising |" in text
    # the paper's two levels are 100 and 1,000 exposures: within 1.75x of one, a point reads
    # against it (168 against 100, 1,680 against 1,000); 333 and 504
    # against both
    from factlab.experiments.capacity_report import paper_line

    assert paper_line(168) == "≈ 1 (100 exposures)"
    assert paper_line(333) == "between ≈ 1 (100) and ≈ 2 (1,000 exposures)"
    assert paper_line(504) == "between ≈ 1 (100) and ≈ 2 (1,000 exposures)"
    assert paper_line(1680) == "≈ 2 (1,000 exposures)"
    assert paper_line(30) == "≈ 1 (100 exposures; these are 0.3x)"


def test_the_table_pools_each_points_seeds_into_its_mean_and_spread():
    from factlab.experiments.capacity_report import capacity_table, points

    # the measured seeds (2026-12-07): three at 2,000 people, one at 8,000, and a run of
    # another series (another learning rate) at 2,000 that is not pooled with them
    fast = _cap("n2k-fast", 80_000, 100, people=2000, series="other", entropy=94_000.0)
    fast["capacity"].update(batch_size=16, lr=0.006)
    rows = [_at("n8k", 73_933, 8000), _at("n2k-s0", 71_662, 2000),
            _at("n2k-s1", 56_188, 2000), _at("n2k-s2", 61_619, 2000), fast]
    got = [[r["cell"] for r in rs] for rs in points(rows)]
    assert got == [["n2k-s0", "n2k-s1", "n2k-s2"], ["n2k-fast"], ["n8k"]]
    text = "\n".join(capacity_table(rows))
    assert ("| n2k-s0 | 3 | 2,000 | 23,000 | 100 | **63,156** ± 7,737 | 71,662, 56,188, 61,619 "
            "| 67.2% | 2.746 | below capacity (more people stored more) |") in text
    assert "| n8k | 1 | 8,000 | 23,000 | 100 | **73,933** | 73,933 |" in text
    # the training column tells the two 2,000-person points apart (– where not recorded)
    assert "| n2k-fast | 1 | 2,000 | 23,000 | 100 | **80,000** |" in text
    assert text.count("| unknown | 16 × 0.006 |") == 2  # the run's row and its point's
    assert "(more people stored more) | – |" in text
    # every run alone: the per-run table says it all
    assert "runs pooled" not in "\n".join(capacity_table(rows[:2]))


def test_a_value_is_scored_where_no_follower_gives_it_away():
    from factlab.evaluate.capacity import clean_docs
    from factlab.text.documents import Docs
    from factlab.world.people import Derived

    # attributes: 0 employer, 1 company city (follows the employer), 2 major. Person 0's
    # first bio states the city before the employer, its second after; person 1's only
    # bio states the city first: the employer has no clean bio there (-1, counted as
    # chance), while the major and the city are scored in each person's first bio
    spans = np.array([[[30, 40], [10, 20], [50, 60]],     # p0 entry 0: city first
                      [[10, 20], [30, 40], [50, 60]],     # p0 entry 1: employer first
                      [[30, 40], [10, 20], [0, 5]]])      # p1 entry 0: city first
    docs = Docs(["a", "b", "c"], np.array([0, 0, 1]), np.array([0, 1, 0]), spans,
                ("employer", "company_city", "major"))
    follows = (Derived(attribute=1, source=0, codes=np.zeros(3, dtype=np.int32)),)
    got = clean_docs(docs, follows)
    assert got.tolist() == [[1, -1], [0, 2], [0, 2]]
    # without the follower every attribute is read in the first bio
    assert clean_docs(docs).tolist() == [[0, 2], [0, 2], [0, 2]]
    # the entry decides, not the order the documents come in
    rev = Docs(["b", "a", "c"], np.array([0, 0, 1]), np.array([1, 0, 0]),
               spans[[1, 0, 2]], docs.attributes)
    assert clean_docs(rev).tolist() == [[1, 2], [1, 2], [1, 2]]
