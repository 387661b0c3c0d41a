"""Sampling people: unique names, uniform independent fields, derived company city."""

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare

from factlab.errors import FactlabError
from factlab.world import WorldConfig, make_world
from factlab.world.pools import available, load_pools
from factlab.world.config import PoolSizes
from factlab.world.sample import unique_name_keys

from conftest import make


def test_shipped_pools_have_paper_sizes_and_no_duplicates():
    have = available()
    assert have["first"] >= 400 and have["middle"] >= 400 and have["last"] >= 1000
    assert have["cities"] >= 200 and have["universities"] >= 300
    assert have["majors"] >= 100 and have["companies"] >= 263
    p = load_pools(PoolSizes())
    for pool in (p.first, p.middle, p.last, p.cities, p.universities, p.majors, p.companies):
        assert len({x.lower() for x in pool}) == len(pool)
    assert all(c.count(", ") == 1 and len(c.split(", ")[1]) == 2 for c in p.cities + p.company_city)
    assert set(p.first_gender) == {"m", "f"}
    assert len(p.date_strings()) == 200 * 12 * 28 == p.n_dates


def test_full_names_unique_even_near_capacity():
    w = make(people=150, unknown=10, pools={"first": 4, "middle": 4, "last": 10})
    names = w.people.names + w.unknown.names
    assert len(set(names)) == len(names) == 160  # the whole 4*4*10 capacity
    big = make(people=5000, unknown=0)
    assert len(set(big.people.names)) == 5000


def test_vectorised_rejection_gives_distinct_keys():
    g = np.random.default_rng(0)
    keys = unique_name_keys(1000, 400, g)  # heavy collisions on the first draw
    assert len(np.unique(keys)) == 400 and keys.min() >= 0 and keys.max() < 1000


def test_too_many_people_is_a_clear_error():
    with pytest.raises(FactlabError, match=r"at most 160 .*4 first x 4 middle x 10 last"):
        make(people=155, unknown=10, pools={"first": 4, "middle": 4, "last": 10})
    with pytest.raises(FactlabError, match="pools.cities=5000"):
        make(people=10, pools={"cities": 5000})


@pytest.fixture(scope="module")
def big_world():
    return make_world(WorldConfig(people=20000, seed=11, unknown=0))


def test_fields_are_uniform_chi_square(big_world):
    t = big_world.people
    n = len(t)
    pools = load_pools(PoolSizes())
    dates = t.codes[:, 0]
    for name, codes, k in [
        ("birth_year", dates // (12 * 28), 200), ("birth_month", (dates // 28) % 12, 12),
        ("birth_day", dates % 28, 28), ("birth_city", t.codes[:, 1], 200),
        ("university", t.codes[:, 2], 300), ("major", t.codes[:, 3], 100),
        ("employer", t.codes[:, 4], 263),
    ]:
        counts = np.bincount(codes, minlength=k)
        assert len(counts) == k, name
        p = chisquare(counts).pvalue
        assert p > 1e-4, f"{name} not uniform (p={p:.2g})"
    first = np.array([pools.first.index(nm.split()[0]) for nm in t.names])
    assert chisquare(np.bincount(first, minlength=400)).pvalue > 1e-4
    assert n == 20000


def test_fields_are_independent(big_world):
    c = big_world.people.codes
    table = np.zeros((12, 10))
    np.add.at(table, ((c[:, 0] // 28) % 12, c[:, 3] % 10), 1)  # birth month x major bucket
    assert chi2_contingency(table).pvalue > 1e-4


def test_uniformity_test_would_catch_a_skewed_sampler():
    # the same statistic on a skewed draw fails: the test above can fail
    g = np.random.default_rng(0)
    skew = np.minimum(g.integers(0, 200, 20000), g.integers(0, 200, 20000))
    assert chisquare(np.bincount(skew, minlength=200)).pvalue < 1e-4


def test_company_city_is_a_function_of_the_employer(big_world):
    t = big_world.people
    pools = load_pools(PoolSizes())
    seen = {}
    for emp, city in zip(t.column("employer"), t.column("company_city")):
        assert seen.setdefault(emp, city) == city
        assert pools.company_city[pools.companies.index(emp)] == city
    assert len(seen) == 263


def test_pronoun_matches_first_name_gender(world_small):
    pools = load_pools(PoolSizes())
    gender = dict(zip(pools.first, pools.first_gender))
    t = world_small.people
    counts = np.bincount(t.pronoun, minlength=3)
    assert counts.min() > 0  # he, she and they all present (they_fraction=0.3)
    for name, p in zip(t.names, t.pronoun.tolist()):
        if p != 2:
            assert p == (0 if gender[name.split()[0]] == "m" else 1)


def test_same_seed_same_people_any_augmentation():
    a = make(people=200, seed=5, augment="single")
    b = make(people=200, seed=5, augment="multi5+permute")
    c = make(people=200, seed=6)
    assert a.people.names == b.people.names
    assert (a.people.codes == b.people.codes).all() and (a.split == b.split).all()
    assert a.people.names != c.people.names


def test_split_is_half_half_and_disjoint(world_small):
    tr, te = set(world_small.train_ids.tolist()), set(world_small.test_ids.tolist())
    assert not tr & te and len(tr | te) == 300 and len(te) == 150


def test_unknown_people_never_in_documents(world_small):
    names = set(world_small.people.names)
    assert not names & set(world_small.unknown.names)
    text = "\n".join(world_small.bios().text)
    assert not any(u in text for u in world_small.unknown.names)


def test_unknown_config_key_is_an_error():
    from factlab.config import build
    with pytest.raises(FactlabError, match="unknown key 'pools.citys'"):
        build(WorldConfig, {"pools": {"citys": 3}})
    with pytest.raises(FactlabError, match="people"):
        build(WorldConfig, {"people": -3})
