"""Cohorts: new people who arrive in a later experience of an existing world.

A cohort is drawn from the world's own pools (the same value codes, the same name pools,
derived attributes following their source), with full names that no person, earlier
cohort member or unknown person has. Its people are appended after everyone else, so no
existing id, code or split moves; each gets its own P_train / P_test split, so both "learned
from the text" (P_test) and "learned from its QA" (P_train) can be measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from factlab.errors import FactlabError
from factlab.world.people import CELEBRITY, IT, Table
from factlab.world.versions import check_experience

STREAM_COHORT = 6  # of factlab.world.sample.rng's streams


def fresh_name_keys(world, n: int, g: np.random.Generator) -> np.ndarray:
    """``n`` distinct name keys whose names nobody in the world (people, unknown) has."""
    from factlab.world.sample import unique_name_keys

    names = world.names
    taken = set(world.people.names) | set(world.unknown.names)
    cap = names.capacity
    if n > cap - len(taken):
        raise FactlabError(f"cannot give {n} new people unique full names: the name pools allow "
                           f"{cap} and {len(taken)} are taken; make the world with larger "
                           f"pools.first/middle/last")
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < n:
        want = n - len(out)
        keys = unique_name_keys(cap, min(cap, 2 * want + 8), g)
        for k, nm in zip(keys.tolist(), names.names(keys)):
            if k not in seen and nm not in taken:
                seen.add(k)
                out.append(k)
                if len(out) == n:
                    break
    return np.array(out, dtype=np.int64)


def sample_cohort_table(world, n: int, g: np.random.Generator) -> Table:
    """``n`` new people: fresh names, pronouns as the world's, values uniform per pool."""
    keys = fresh_name_keys(world, n, g)
    nm = world.names
    names = nm.names(keys)
    if world.source == "facts":  # a fact file's entities: "it"
        pronoun = np.full(n, IT, dtype=np.int8)
    else:
        gender = np.array([0 if x == "m" else 1 for x in nm.first_gender], dtype=np.int8)
        pronoun = gender[nm.split_keys(keys)[0]]
        if world.config.they_fraction > 0:
            pronoun = np.where(g.random(n) < world.config.they_fraction, 2, pronoun).astype(np.int8)
    pools = world.people.pools
    A = len(pools)
    codes = np.full((n, A), -1, dtype=np.int32)
    derived = {d.attribute: d for d in world.derived}
    for a in range(A):
        if a not in derived:
            codes[:, a] = g.integers(0, len(pools[a]), n)
    for a, d in derived.items():
        codes[:, a] = d.codes[codes[:, d.source]]
    return Table(names, pronoun, world.attributes, codes, pools)


def add_cohort(world, n: int, experience: int, seed: int, *,
               test_fraction: float | None = None):
    """A new world with ``n`` new people arriving in ``experience`` (seeded by ``seed`` and
    the experience). ``world`` is not changed; no existing person, code or split moves."""
    from factlab.world.sample import half_split

    check_experience(world, experience, "add_cohort")
    if (world.arrival == experience).any():
        raise FactlabError(f"add_cohort: experience {experience} already has a cohort")
    if n < 2:
        raise FactlabError(f"add_cohort: a cohort needs at least 2 people (P_train and "
                           f"P_test), got {n}")
    g = np.random.default_rng([seed, STREAM_COHORT, experience])
    new = sample_cohort_table(world, n, g)
    frac = world.config.test_fraction if test_fraction is None else test_fraction
    split = half_split(n, frac, np.random.default_rng([seed, STREAM_COHORT, experience, 1]))
    p = world.people
    people = Table(p.names + new.names, np.concatenate([p.pronoun, new.pronoun]), p.attributes,
                   np.concatenate([p.codes, new.codes]), p.pools)
    return dataclasses.replace(
        world, people=people, split=np.concatenate([world.split, split]),
        group=np.concatenate([world.group, np.full(n, CELEBRITY, dtype=np.int8)]),
        arrival=np.concatenate([world.arrival, np.full(n, experience, dtype=np.int16)]))


def add_entities(world, table: Table, experience: int, seed: int, *,
                 test_fraction: float | None = None):
    """A new world in which the entities of ``table`` (names and codes into the world's
    own pools) arrive in ``experience``: a user's fact file of a later experience. Names
    must be new (no person or unknown person has them); the P_train / P_test split is
    seeded like a cohort's."""
    from factlab.world.sample import half_split

    check_experience(world, experience, "add_entities")
    if (world.arrival == experience).any():
        raise FactlabError(f"add_entities: experience {experience} already has new entities")
    n = len(table)
    if n < 1:
        raise FactlabError("add_entities: no entities given")
    if tuple(table.attributes) != tuple(world.attributes) or len(table.pools) != len(
            world.people.pools) or any(len(a) != len(b) for a, b in zip(table.pools,
                                                                         world.people.pools)):
        raise FactlabError("add_entities: the entities' attributes and pools must be the "
                           "world's")
    taken = set(world.people.names) | set(world.unknown.names)
    clash = [nm for nm in table.names if nm in taken]
    if clash:
        raise FactlabError(f"add_entities: {clash[0]!r} is already in the world")
    frac = world.config.test_fraction if test_fraction is None else test_fraction
    g = np.random.default_rng([seed, STREAM_COHORT, experience, 1])
    split = half_split(n, frac, g) if n >= 2 else np.zeros(n, np.int8)
    p = world.people
    people = Table(p.names + list(table.names), np.concatenate([p.pronoun, table.pronoun]),
                   p.attributes, np.concatenate([p.codes, table.codes]), p.pools)
    return dataclasses.replace(
        world, people=people, split=np.concatenate([world.split, split]),
        group=np.concatenate([world.group, np.full(n, CELEBRITY, dtype=np.int8)]),
        arrival=np.concatenate([world.arrival, np.full(n, experience, dtype=np.int16)]))


def extend_pools(world, values: dict[int, list[str]]):
    """A new world whose pool of attribute ``a`` also holds ``values[a]`` (appended, so no
    code moves): values that later experiences of a user's stream bring."""
    pools = [list(p) for p in world.people.pools]
    for a, vals in values.items():
        have = set(pools[a])
        for v in vals:
            if v not in have:
                pools[a].append(v)
                have.add(v)
    pools = tuple(pools)
    p, u = world.people, world.unknown
    return dataclasses.replace(
        world, people=Table(p.names, p.pronoun, p.attributes, p.codes, pools),
        unknown=Table(u.names, u.pronoun, u.attributes, u.codes, pools))


def add_attributes(world, names):
    """A new world that also has attributes ``names`` (appended, empty pools; every
    existing entity has no value for them, code -1): a later experience of a stream that
    brings facts of another kind (a user's fact file after a biography world). Values
    come with :func:`extend_pools`; no existing code moves."""
    names = [n for n in names if n not in world.attributes]
    if not names:
        return world
    dup = [n for n in set(names) if names.count(n) > 1]
    if dup:
        raise FactlabError(f"add_attributes: {dup[0]!r} is given twice")
    attrs = tuple(world.attributes) + tuple(names)
    pools = tuple(list(p) for p in world.people.pools) + tuple([] for _ in names)

    def widen(t: Table) -> Table:
        codes = np.concatenate([t.codes, np.full((len(t), len(names)), -1, np.int32)], axis=1)
        return Table(t.names, t.pronoun, attrs, codes, pools)

    return dataclasses.replace(world, people=widen(world.people),
                               unknown=widen(world.unknown))
