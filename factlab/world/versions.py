"""Versioned facts: an attribute of a known person takes a new value from an experience on.

The base world is experience 0 and is never rewritten: an update is a row (person,
attribute, experience, new code, previous code), and ``World.codes_at(t)`` applies every
update of experiences 1..t. The previous value is kept because the continual-learning
metrics ask for it by name (a *stale* answer is the value before the update).

A derived attribute follows its source: updating a bioS employer also moves the company
city to the new employer's HQ, and that counts as an update only where the city actually
changes (two companies may share a city).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError

STREAM_UPDATE = 7  # of factlab.world.sample.rng's streams


@dataclass(frozen=True)
class Updates:
    """Rows in experience order (stable within an experience: the order they were made)."""

    person: np.ndarray  # (U,) int32
    attribute: np.ndarray  # (U,) int16
    experience: np.ndarray  # (U,) int16, >= 1
    code: np.ndarray  # (U,) int32, the new value's code
    previous: np.ndarray  # (U,) int32, the code it replaces (the stale value)

    @classmethod
    def empty(cls) -> Updates:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int16), np.zeros(0, np.int16),
                   np.zeros(0, np.int32), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.person)

    def take(self, mask) -> Updates:
        return Updates(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    def of(self, experience: int) -> Updates:
        return self.take(self.experience == experience)

    def concat(self, other: Updates) -> Updates:
        return Updates(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                         for f in dataclasses.fields(self)))


def check_experience(world, experience: int, what: str) -> None:
    """Experiences are added in order: each one after (or equal to) the latest so far."""
    if not isinstance(experience, (int, np.integer)) or experience < 1:
        raise FactlabError(f"{what}: experience must be an integer >= 1 (0 is the base "
                           f"world), got {experience!r}")
    if experience < world.last_experience:
        raise FactlabError(f"{what}: experience {experience} comes before the world's latest "
                           f"experience {world.last_experience}; add experiences in order")


def update_facts(world, people, attribute: str, experience: int, seed: int):
    """A new world in which every person of ``people`` has a new value of ``attribute``
    from ``experience`` on: drawn uniformly (seeded) among the pool's other values.

    ``people`` must have arrived before ``experience`` and not have ``attribute`` updated
    in it already. Derived attributes (bioS company city) follow; a derived attribute
    itself cannot be updated. ``world`` is not changed.
    """
    attrs = world.attributes
    if attribute not in attrs:
        raise FactlabError(f"update_facts: unknown attribute {attribute!r} "
                           f"(attributes: {', '.join(attrs)})")
    a = attrs.index(attribute)
    followers = [d for d in world.derived if d.source == a]
    for d in world.derived:
        if d.attribute == a:
            raise FactlabError(f"update_facts: {attribute} follows {attrs[d.source]}; update "
                               f"{attrs[d.source]} instead")
    check_experience(world, experience, "update_facts")
    ids = np.asarray(people, dtype=np.int64).reshape(-1)
    n = len(world.people)
    if len(ids) == 0:
        raise FactlabError("update_facts: no people given")
    if ids.min() < 0 or ids.max() >= n:
        raise FactlabError(f"update_facts: person ids must be in [0, {n})")
    if len(np.unique(ids)) != len(ids):
        raise FactlabError("update_facts: a person is given twice")
    late = ids[world.arrival[ids] >= experience]
    if len(late):
        raise FactlabError(f"update_facts: {world.people.names[int(late[0])]!r} arrives in "
                           f"experience {int(world.arrival[late[0]])}, not before {experience}")
    u = world.updates
    again = np.isin(ids, u.person[(u.experience == experience) & (u.attribute == a)])
    if again.any():
        raise FactlabError(f"update_facts: {attribute} of {world.people.names[int(ids[again][0])]!r} "
                           f"is already updated in experience {experience}")
    now = world.codes_at(experience)
    old = now[ids, a]
    if (old < 0).any():
        raise FactlabError(f"update_facts: {world.people.names[int(ids[old < 0][0])]!r} has no "
                           f"{attribute} to update")
    k = len(world.people.pools[a])
    if k < 2:
        raise FactlabError(f"update_facts: {attribute} has a single value; nothing to change to")
    g = np.random.default_rng([seed, STREAM_UPDATE, experience, a])
    # uniform over the k - 1 other values: draw in [0, k-1) and skip the current one
    new = g.integers(0, k - 1, len(ids)).astype(np.int32)
    new = new + (new >= old)
    rows = [(ids, np.full(len(ids), a), new, old)]
    for d in followers:
        fold, fnew = now[ids, d.attribute], d.codes[new]
        moved = fnew != fold
        rows.append((ids[moved], np.full(int(moved.sum()), d.attribute), fnew[moved], fold[moved]))
    add = Updates(
        np.concatenate([r[0] for r in rows]).astype(np.int32),
        np.concatenate([r[1] for r in rows]).astype(np.int16),
        np.full(sum(len(r[0]) for r in rows), experience, dtype=np.int16),
        np.concatenate([r[2] for r in rows]).astype(np.int32),
        np.concatenate([r[3] for r in rows]).astype(np.int32))
    return dataclasses.replace(world, updates=u.concat(add))


def set_values(world, people, attribute: str, codes, experience: int):
    """A new world in which ``people[k]`` has value code ``codes[k]`` of ``attribute`` from
    ``experience`` on (a user's later fact file restating a fact with another value, or
    stating one the entity had no value for: previous code -1). Derived attributes are not
    followed (user worlds have none)."""
    attrs = world.attributes
    if attribute not in attrs:
        raise FactlabError(f"set_values: unknown attribute {attribute!r}")
    a = attrs.index(attribute)
    check_experience(world, experience, "set_values")
    ids = np.asarray(people, dtype=np.int64).reshape(-1)
    new = np.asarray(codes, dtype=np.int64).reshape(-1)
    if len(ids) != len(new) or not len(ids):
        raise FactlabError("set_values: give one code per person (at least one)")
    if len(np.unique(ids)) != len(ids):
        raise FactlabError("set_values: a person is given twice")
    if (new < 0).any() or (new >= len(world.people.pools[a])).any():
        raise FactlabError(f"set_values: codes of {attribute} must index its pool")
    late = ids[world.arrival[ids] >= experience]
    if len(late):
        raise FactlabError(f"set_values: {world.people.names[int(late[0])]!r} arrives in "
                           f"experience {int(world.arrival[late[0]])}, not before {experience}")
    old = world.codes_at(experience)[ids, a]
    if (old == new).any():
        raise FactlabError(f"set_values: {world.people.names[int(ids[old == new][0])]!r} "
                           f"already has that {attribute}")
    add = Updates(ids.astype(np.int32), np.full(len(ids), a, np.int16),
                  np.full(len(ids), experience, np.int16), new.astype(np.int32),
                  old.astype(np.int32))
    return dataclasses.replace(world, updates=world.updates.concat(add))
