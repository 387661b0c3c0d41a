"""Making worlds: sampling bioS people from the pools, celebrity worlds, user fact files.

Randomness comes from independent streams of one seed (people, split, unknown people;
rendering and paraphrases are drawn by the text layer from streams of the same seed),
so e.g. changing the augmentation never changes who the people are — the single vs
multi5+permute comparison is on the very same people.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factlab.errors import FactlabError
from factlab.io import sha256_file
from factlab.world.config import WorldConfig
from factlab.world.facts import facts_table, read_facts
from factlab.world.people import (ATTRIBUTES, CELEBRITY, MINORITY, TEST, TRAIN, Derived, Table,
                                  World)
from factlab.world.pools import Pools, load_pools

# Streams of one seed. 4 and 5 are the text layer's (bios, held-out paraphrases); 6 and 7
# are cohorts' and updates' (factlab.world.cohorts / versions).
STREAM_PEOPLE, STREAM_SPLIT, STREAM_UNKNOWN, STREAM_RENDER, STREAM_PARAPHRASE = 1, 2, 3, 4, 5


def rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def unique_name_keys(capacity: int, n: int, g: np.random.Generator) -> np.ndarray:
    """``n`` distinct integers in [0, capacity), each uniform: rejection sampling, vectorised
    (duplicates after their first occurrence are redrawn until none is left)."""
    if n > capacity:
        raise ValueError("n > capacity")
    if n > capacity // 2:  # rejection would crawl near capacity; same distribution
        return g.permutation(capacity)[:n].astype(np.int64)
    keys = g.integers(0, capacity, size=n, dtype=np.int64)
    while True:
        _, first = np.unique(keys, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        k = int(dup.sum())
        if k == 0:
            return keys
        keys[dup] = g.integers(0, capacity, size=k, dtype=np.int64)


def company_cities(pools: Pools) -> tuple[list[str], np.ndarray]:
    """Distinct HQ cities (first-appearance order) and each company's code into them."""
    index: dict[str, int] = {}
    hq = np.array([index.setdefault(c, len(index)) for c in pools.company_city], dtype=np.int32)
    return list(index), hq


def sample_table(pools: Pools, n: int, g: np.random.Generator, they_fraction: float) -> Table:
    """``n`` people with unique full names and independent uniform fields."""
    F, Mi, L = len(pools.first), len(pools.middle), len(pools.last)
    cap = F * Mi * L
    if n > cap:
        raise FactlabError(
            f"cannot give {n} people unique full names: the pools allow at most {cap} "
            f"({F} first x {Mi} middle x {L} last names); raise pools.first/middle/last "
            f"or lower people/unknown")
    keys = unique_name_keys(cap, n, g)
    first, middle, last = keys // (Mi * L), (keys // L) % Mi, keys % L
    names = [f"{pools.first[a]} {pools.middle[b]} {pools.last[c]}"
             for a, b, c in zip(first.tolist(), middle.tolist(), last.tolist())]
    gender = np.array([0 if pools.first_gender[i] == "m" else 1 for i in range(F)], dtype=np.int8)
    pronoun = gender[first]
    if they_fraction > 0:
        pronoun = np.where(g.random(n) < they_fraction, 2, pronoun).astype(np.int8)
    hq_pool, hq = company_cities(pools)
    employer = g.integers(0, len(pools.companies), n)
    codes = np.stack([
        g.integers(0, pools.n_dates, n),
        g.integers(0, len(pools.cities), n),
        g.integers(0, len(pools.universities), n),
        g.integers(0, len(pools.majors), n),
        employer,
        hq[employer],  # company city is a function of the employer, never sampled
    ], axis=1).astype(np.int32)
    value_pools = (pools.date_strings(), list(pools.cities), list(pools.universities),
                   list(pools.majors), list(pools.companies), hq_pool)
    return Table(names, pronoun, ATTRIBUTES, codes, value_pools)


def make_world(cfg: WorldConfig) -> World:
    """Build a world from its config (sampled bioS people, celebrity world or user facts)."""
    if cfg.facts:
        return _facts_world(cfg)
    pools = load_pools(cfg.pools)
    total = cfg.people + cfg.minority
    everyone = sample_table(pools, total + cfg.unknown, rng(cfg.seed, STREAM_PEOPLE),
                            cfg.they_fraction)
    people, unknown = everyone.take(np.arange(total)), everyone.take(np.arange(total, len(everyone)))
    group = np.full(total, CELEBRITY, dtype=np.int8)
    if cfg.minority:
        # celebrity world: QA is trained on celebrities and tested on the minority
        group[cfg.people:] = MINORITY
        split = np.where(group == MINORITY, TEST, TRAIN).astype(np.int8)
    else:
        split = half_split(total, cfg.test_fraction, rng(cfg.seed, STREAM_SPLIT))
    _, hq = company_cities(pools)
    derived = (Derived(ATTRIBUTES.index("company_city"), ATTRIBUTES.index("employer"), hq),)
    return World(cfg, people, split, group, unknown, pools.names, source="bioS",
                 derived=derived)


def half_split(n: int, test_fraction: float, g: np.random.Generator) -> np.ndarray:
    n_test = int(round(n * test_fraction))
    if not 1 <= n_test <= n - 1:
        raise FactlabError(f"test_fraction={test_fraction} leaves an empty P_train or P_test "
                           f"with {n} people")
    split = np.full(n, TRAIN, dtype=np.int8)
    split[g.permutation(n)[:n_test]] = TEST
    return split


def _facts_world(cfg: WorldConfig) -> World:
    if cfg.minority:
        raise FactlabError("minority: celebrity worlds are sampled, not read from a fact file")
    pronouns: dict[str, str] = {}
    entities, attributes, facts = read_facts(cfg.facts, pronouns=pronouns)
    people = facts_table(entities, attributes, facts, pronouns)
    split = half_split(len(people), cfg.test_fraction, rng(cfg.seed, STREAM_SPLIT))
    # unknown entities: fresh names from the pools (never equal to a real entity), values
    # drawn uniformly from each attribute's observed values
    g = rng(cfg.seed, STREAM_UNKNOWN)
    pools = load_pools(cfg.pools)
    taken = set(entities)
    cand = sample_table(pools, min(cfg.unknown + len(taken), len(pools.first) * len(pools.middle)
                                   * len(pools.last)), g, 0.0)
    names = [nm for nm in cand.names if nm not in taken][: cfg.unknown]
    codes = np.stack([g.integers(0, max(len(p), 1), len(names)) for p in people.pools],
                     axis=1).astype(np.int32) if names else np.zeros((0, len(attributes)), np.int32)
    unknown = Table(names, np.full(len(names), -1, np.int8), people.attributes, codes, people.pools)
    group = np.full(len(people), CELEBRITY, dtype=np.int8)
    return World(cfg, people, split, group, unknown, pools.names, source="facts",
                 facts_sha256=sha256_file(Path(cfg.facts)))
