"""People tables and the World object every later stage reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factlab.text.templates import PRONOUNS, TemplateSet
from factlab.world.config import WorldConfig

# The six bioS attributes in canonical order (employer before company city).
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "company_city")

TRAIN, TEST = 0, 1  # values of World.split
CELEBRITY, MINORITY = 0, 1  # values of World.group (celebrity worlds)


@dataclass
class Table:
    """Columnar facts. Entity ``i`` has value ``pools[a][codes[i, a]]`` for attribute ``a``
    (code -1: the entity has no value for it). ``pronoun`` holds codes into
    :data:`~factlab.text.templates.PRONOUNS` (-1: always refer to the entity by name)."""

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

    def record(self, i: int) -> dict:
        p = int(self.pronoun[i])
        rec = {"name": self.names[i], "pronoun": PRONOUNS[p] if p >= 0 else None}
        for a, attr in enumerate(self.attributes):
            rec[attr] = self.value(i, a)
        return rec


@dataclass
class World:
    """People, their split, the unknown people, templates and the config that made them.

    ``split[i]`` is TRAIN (P_train: QAs trained on) or TEST (P_test: bios seen, QAs never);
    ``group[i]`` is CELEBRITY or MINORITY in a celebrity world (all CELEBRITY otherwise).
    ``unknown`` people come from the same pools but are never rendered into any document.
    """

    config: WorldConfig
    people: Table
    split: np.ndarray
    group: np.ndarray
    unknown: Table
    templates: TemplateSet
    source: str = "bioS"  # "bioS" (sampled from pools) or "facts" (a user's fact file)
    facts_sha256: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.people.attributes

    @property
    def train_ids(self) -> np.ndarray:
        return np.flatnonzero(self.split == TRAIN)

    @property
    def test_ids(self) -> np.ndarray:
        return np.flatnonzero(self.split == TEST)

    def augment_of(self, i: int) -> str:
        return self.config.minority_augment if self.group[i] == MINORITY else self.config.augment

    def bios(self):
        """Render every person's bio documents (cached)."""
        if "bios" not in self._cache:
            from factlab.text.documents import render_world

            self._cache["bios"] = render_world(self)
        return self._cache["bios"]

    def qa(self, people=None, *, paraphrase: bool = False, all_paraphrases: bool = False):
        """QA pairs for ``people`` (default: everyone): the canonical question, or held-out
        paraphrases — one seeded draw per (person, attribute), or all of them."""
        from factlab.text.qa import qa_pairs
        from factlab.world.sample import STREAM_PARAPHRASE, rng

        ids = np.arange(len(self.people)) if people is None else np.asarray(people)
        if paraphrase and not all_paraphrases:
            # drawn for everyone, then subset: a person's phrasing never depends on `people`
            draws = qa_pairs(self.people, np.arange(len(self.people)), self.templates,
                             paraphrase=True, g=rng(self.config.seed, STREAM_PARAPHRASE))
            if people is None:
                return draws
            keep = np.isin(draws.person, ids)
            idx = np.flatnonzero(keep).tolist()
            return type(draws)(draws.person[keep], draws.attribute[keep], draws.template[keep],
                               [draws.question[i] for i in idx], [draws.answer[i] for i in idx],
                               draws.attributes, True)
        return qa_pairs(self.people, ids, self.templates, paraphrase=paraphrase)
