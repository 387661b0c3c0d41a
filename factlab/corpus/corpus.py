"""A corpus: a world (pure data) together with how it is written out as text.

This is what every later stage reads — tokenizers, streams, evaluation, probes — and what
a world directory holds. It answers the questions the old all-in-one ``World`` did
(``bios()``, ``qa(...)``, ``people``, ``train_ids``, ...) by asking the world for data
and :mod:`factlab.text.render` for text, so neither of those two layers needs the other's
half: the world never imports text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factlab.corpus.config import CorpusConfig
from factlab.text import render as R
from factlab.text.config import RenderConfig
from factlab.text.documents import Docs
from factlab.text.qa import QA
from factlab.text.templates import TemplateSet
from factlab.world.cohorts import add_cohort
from factlab.world.people import MINORITY, Table, World
from factlab.world.sample import make_world
from factlab.world.versions import Updates, update_facts


@dataclass
class Corpus:
    world: World
    render: RenderConfig
    templates: TemplateSet
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- the world's data, read through ------------------------------------------------
    @property
    def config(self) -> CorpusConfig:
        return CorpusConfig.join(self.world.config, self.render)

    @property
    def people(self) -> Table:
        return self.world.people

    @property
    def unknown(self) -> Table:
        return self.world.unknown

    @property
    def split(self) -> np.ndarray:
        return self.world.split

    @property
    def group(self) -> np.ndarray:
        return self.world.group

    @property
    def arrival(self) -> np.ndarray:
        return self.world.arrival

    @property
    def updates(self) -> Updates:
        return self.world.updates

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.world.attributes

    @property
    def source(self) -> str:
        return self.world.source

    @property
    def facts_sha256(self) -> str | None:
        return self.world.facts_sha256

    @property
    def seed(self) -> int:
        return self.world.seed

    @property
    def base_ids(self) -> np.ndarray:
        return self.world.base_ids

    @property
    def train_ids(self) -> np.ndarray:
        return self.world.train_ids

    @property
    def test_ids(self) -> np.ndarray:
        return self.world.test_ids

    @property
    def experiences(self) -> list[int]:
        return self.world.experiences

    def ids(self, arrival: int | None = None, split: int | None = None) -> np.ndarray:
        return self.world.ids(arrival, split)

    def codes_at(self, t: int) -> np.ndarray:
        return self.world.codes_at(t)

    def table_at(self, t: int) -> Table:
        return self.world.table_at(t)

    def value(self, i: int, a: int | str, *, at: int = 0) -> str | None:
        return self.world.value(i, a, at=at)

    def augment_of(self, i: int) -> str:
        return self.render.minority_augment if self.group[i] == MINORITY else self.render.augment

    # -- text ----------------------------------------------------------------------------
    def bios(self) -> Docs:
        """The base world's bio documents (cached; a loaded corpus: the stored ones)."""
        if "bios" not in self._cache:
            self._cache["bios"] = R.render(self.world, self.render, self.templates)
        return self._cache["bios"]

    def cohort_bios(self, experience: int) -> Docs:
        """Bios of the cohort arriving in ``experience``."""
        key = ("cohort_bios", experience)
        if key not in self._cache:
            self._cache[key] = R.cohort_bios(self.world, self.render, self.templates, experience)
        return self._cache[key]

    def update_bios(self, experience: int) -> Docs:
        """Rewritten bios of the people whose values change in ``experience``."""
        key = ("update_bios", experience)
        if key not in self._cache:
            self._cache[key] = R.update_bios(self.world, self.render, self.templates, experience)
        return self._cache[key]

    def qa(self, people=None, *, at: int = 0, paraphrase: bool = False,
           all_paraphrases: bool = False) -> QA:
        """QA pairs for ``people`` (default: the base world's people) answered with their
        values after experience ``at``: canonical questions, or held-out paraphrases (one
        seeded draw per person and attribute, or all of them)."""
        return R.qa(self.world, self.templates, people, at=at, paraphrase=paraphrase,
                    all_paraphrases=all_paraphrases)

    def inverse_qa(self, people=None, *, at: int = 0) -> QA:
        """Inverse-search questions (Part 3.2): all six bioS values of each of ``people``
        (default: the base world's) given, the full name asked."""
        from factlab.text.qa import inverse_pairs

        ids = self.base_ids if people is None else np.asarray(people, dtype=np.int64)
        return inverse_pairs(self.table_at(at), ids)

    # -- later experiences -----------------------------------------------------------------
    def with_world(self, world: World) -> Corpus:
        """The same rendering of an extended world (cohorts, updates). Text already
        rendered stays valid — an extension never changes what came before — so the cache
        is shared."""
        return Corpus(world, self.render, self.templates, dict(self._cache))

    def with_attributes(self, names, templates: str | None = None) -> Corpus:
        """The same corpus with attributes ``names`` added (no entity has them yet): the
        world's columns, the templates (``templates``: a user's YAML laid over the
        shipped or generic ones; attributes it does not name get generic templates) and
        the documents rendered so far (all of them are rendered first), whose spans gain
        empty columns. No text, fact or canonical question of the corpus so far changes;
        the one held-out paraphrase drawn per (person, attribute) is drawn anew over the
        wider table."""
        from factlab.world.cohorts import add_attributes

        world = add_attributes(self.world, names)
        if world is self.world:
            return self
        # render what exists now, so that its text never depends on a later extension
        self.bios()
        for t in self.experiences:
            if (self.arrival == t).any():
                self.cohort_bios(t)
            if (self.world.updates.experience == t).any():
                self.update_bios(t)
        render = self.render
        data = self.templates.to_dict()
        if templates:
            from factlab.config import load_yaml

            for a, entry in load_yaml(templates).items():
                if a not in self.world.attributes:
                    data[a] = entry
        tset = TemplateSet.from_dict(data, templates or "templates", world.attributes)
        cache = {k: (v.with_attributes(world.attributes) if isinstance(v, Docs) else v)
                 for k, v in self._cache.items()}
        return Corpus(world, render, tset, cache)

    def add_cohort(self, n: int, experience: int, seed: int, *,
                   test_fraction: float | None = None) -> Corpus:
        return self.with_world(add_cohort(self.world, n, experience, seed,
                                          test_fraction=test_fraction))

    def update_facts(self, people, attribute: str, experience: int, seed: int) -> Corpus:
        return self.with_world(update_facts(self.world, people, attribute, experience, seed))


def make_corpus(cfg: CorpusConfig) -> Corpus:
    """Make the world of ``cfg`` and say how it is rendered (nothing is rendered yet)."""
    render = cfg.render_config()
    R.check_render(render, facts=bool(cfg.facts), minority=bool(cfg.minority))
    world = make_world(cfg.world_config())
    return Corpus(world, render, R.load_templates(render, world))


__all__ = ["Corpus", "make_corpus"]
