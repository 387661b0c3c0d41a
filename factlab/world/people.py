"""People tables and the World object every later stage reads: pure data, no text."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factlab.world.config import WorldConfig
from factlab.world.pools import NamePools
from factlab.world.versions import Updates

# The six bioS attributes in canonical order (employer before company city).
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "company_city")

# Pronoun codes 0..3 of Table.pronoun; -1 means "always refer to the entity by name".
# Data (who is "she"), not text: the renderer owns every other form of them. bioS people
# are he / she / they; a fact file's entities are "it" unless the file says otherwise.
PRONOUNS = ("he", "she", "they", "it")
IT = 3

TRAIN, TEST = 0, 1  # values of World.split
CELEBRITY, MINORITY = 0, 1  # values of World.group (celebrity worlds)


@dataclass
class Table:
    """Columnar facts. Entity ``i`` has value ``pools[a][codes[i, a]]`` for attribute ``a``
    (code -1: the entity has no value for it). ``pronoun`` holds codes into
    :data:`PRONOUNS` (-1: always refer to the entity by name)."""

    names: list[str]
    pronoun: np.ndarray  # (n,) int8
    attributes: tuple[str, ...]
    codes: np.ndarray  # (n, A) int32
    pools: tuple[list[str], ...]  # per attribute, the value strings

    def __len__(self) -> int:
        return len(self.names)

    def value(self, i: int, a: int | str) -> str | None:
        a = self.attributes.index(a) if isinstance(a, str) else a
        c = int(self.codes[i, a])
        return None if c < 0 else self.pools[a][c]

    def column(self, a: int | str) -> list[str | None]:
        a = self.attributes.index(a) if isinstance(a, str) else a
        pool = self.pools[a]
        return [pool[c] if c >= 0 else None for c in self.codes[:, a].tolist()]

    def take(self, idx) -> Table:
        idx = np.asarray(idx, dtype=np.int64)
        return Table([self.names[i] for i in idx.tolist()], self.pronoun[idx], self.attributes,
                     self.codes[idx], self.pools)

    def with_codes(self, codes: np.ndarray) -> Table:
        """The same entities with other codes (e.g. their values at a later experience)."""
        return Table(self.names, self.pronoun, self.attributes, codes, self.pools)

    def record(self, i: int) -> dict:
        p = int(self.pronoun[i])
        rec = {"name": self.names[i], "pronoun": PRONOUNS[p] if p >= 0 else None}
        for a, attr in enumerate(self.attributes):
            rec[attr] = self.value(i, a)
        return rec


@dataclass(frozen=True)
class Derived:
    """Attribute ``attribute`` is a function of attribute ``source``: its code is
    ``codes[source_code]`` (bioS: the company city is the employer's HQ). It is never
    sampled or updated on its own; it follows its source."""

    attribute: int
    source: int
    codes: np.ndarray  # (len(pools[source]),) int32


@dataclass
class World:
    """People, their split and groups, the unknown people, and how their facts change.

    ``split[i]`` is TRAIN (P_train: QAs trained on) or TEST (P_test: bios seen, QAs never);
    ``group[i]`` is CELEBRITY or MINORITY in a celebrity world (all CELEBRITY otherwise).
    ``unknown`` people come from the same pools (same codes) but are never rendered.

    Experiences: the base world is experience 0. ``arrival[i]`` is the experience person
    ``i`` arrives in (cohorts, :func:`~factlab.world.cohorts.add_cohort`; their ids follow
    the base people's, which never move), and ``updates`` the values that change from an
    experience on (:func:`~factlab.world.versions.update_facts`). ``people.codes`` are the
    values people arrive with; :meth:`codes_at` applies the updates.
    """

    config: WorldConfig
    people: Table
    split: np.ndarray
    group: np.ndarray
    unknown: Table
    names: NamePools  # where new names are drawn from (cohorts)
    source: str = "bioS"  # "bioS" (sampled from pools) or "facts" (a user's fact file)
    facts_sha256: str | None = None
    derived: tuple[Derived, ...] = ()
    arrival: np.ndarray = None  # (n,) int16; None: everyone arrives at 0
    updates: Updates = field(default_factory=Updates.empty)

    def __post_init__(self):
        if self.arrival is None:
            self.arrival = np.zeros(len(self.people), dtype=np.int16)

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.people.attributes

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def base_ids(self) -> np.ndarray:
        return np.flatnonzero(self.arrival == 0)

    @property
    def train_ids(self) -> np.ndarray:
        """P_train of the base world (cohorts: :meth:`ids`)."""
        return np.flatnonzero((self.split == TRAIN) & (self.arrival == 0))

    @property
    def test_ids(self) -> np.ndarray:
        """P_test of the base world (cohorts: :meth:`ids`)."""
        return np.flatnonzero((self.split == TEST) & (self.arrival == 0))

    def ids(self, arrival: int | None = None, split: int | None = None) -> np.ndarray:
        """People who arrive in experience ``arrival`` (any: None) in ``split`` (any: None)."""
        keep = np.ones(len(self.people), dtype=bool)
        if arrival is not None:
            keep &= self.arrival == arrival
        if split is not None:
            keep &= self.split == split
        return np.flatnonzero(keep)

    @property
    def experiences(self) -> list[int]:
        """Every experience after the base that adds people or changes a value."""
        return sorted(set(self.arrival[self.arrival > 0].tolist())
                      | set(self.updates.experience.tolist()))

    @property
    def last_experience(self) -> int:
        return max(self.experiences, default=0)

    def codes_at(self, t: int) -> np.ndarray:
        """(n, A) codes after experience ``t``: updates of experiences 1..t applied. Rows of
        people who arrive after ``t`` hold the values they will arrive with."""
        codes = self.people.codes.copy()
        u = self.updates
        for e in sorted(set(u.experience[u.experience <= t].tolist())):
            on = u.experience == e  # one row per (person, attribute) within an experience
            codes[u.person[on], u.attribute[on]] = u.code[on]
        return codes

    def table_at(self, t: int) -> Table:
        return self.people if t <= 0 or not len(self.updates) else \
            self.people.with_codes(self.codes_at(t))

    def value(self, i: int, a: int | str, *, at: int = 0) -> str | None:
        a = self.attributes.index(a) if isinstance(a, str) else a
        c = int(self.people.codes[i, a])
        u = self.updates
        hit = np.flatnonzero((u.person == i) & (u.attribute == a) & (u.experience <= at))
        if len(hit):
            c = int(u.code[hit[-1]])
        return None if c < 0 else self.people.pools[a][c]
