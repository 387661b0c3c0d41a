"""Rendering a world: which people, with their values after which experience, from which
random stream, in which augmentation and style.

The world (:mod:`factlab.world`) is pure data; everything that turns it into text is
here and in the modules this one calls (templates, augmentations, the vectorised bioS
renderer, the bioR grammar, QA). Streams of the world's seed keep every draw
independent: the base world's bios use stream 4 exactly as before cohorts existed, and
each later experience has streams of its own, so adding an experience never changes a
byte of anything rendered earlier.
"""

from __future__ import annotations

import numpy as np

from factlab.config import load_yaml
from factlab.errors import FactlabError
from factlab.text.augment import parse_augment
from factlab.text.config import RenderConfig
from factlab.text.documents import Docs, render_bios
from factlab.text.qa import QA, qa_pairs
from factlab.text.templates import TemplateSet, bios_templates
from factlab.world.people import CELEBRITY, MINORITY
from factlab.world.sample import STREAM_PARAPHRASE, STREAM_RENDER, rng

COHORT, UPDATE = 0, 1  # the two kinds of bios an experience can bring


def check_render(cfg: RenderConfig, *, facts: bool, minority: bool) -> None:
    """Fail early, with one line, on an augmentation this world cannot be rendered with."""
    spec = parse_augment(cfg.augment)
    if minority:
        parse_augment(cfg.minority_augment)
    if facts and (spec.reverse or spec.order == "couple"):
        raise FactlabError(f"augment={cfg.augment!r}: reverse and couple need the six bioS "
                           f"attributes and pronouns; not available for fact files")


def load_templates(cfg: RenderConfig, world) -> TemplateSet:
    """Shipped bioS (or, for fact files, generic) templates with a user's file laid over."""
    base = bios_templates() if world.source == "bioS" else None
    data = base.to_dict() if base is not None else {}
    if cfg.templates:
        user = load_yaml(cfg.templates)
        for a, entry in user.items():
            if isinstance(entry, dict) and isinstance(data.get(a), dict):
                data[a] = {**data[a], **entry}
            else:
                data[a] = entry
    return TemplateSet.from_dict(data, cfg.templates or "templates", world.attributes)


def experience_rng(seed: int, experience: int, kind: int) -> np.random.Generator:
    """The bios stream of one experience's cohort (kind COHORT) or rewritten bios (UPDATE)."""
    return np.random.default_rng([seed, STREAM_RENDER, experience, kind])


def render(world, cfg: RenderConfig, templates: TemplateSet, people=None, *, at: int = 0,
           g: np.random.Generator | None = None) -> Docs:
    """Bios of ``people`` (default: the base world's) stating their values after
    experience ``at``; each group with its augmentation, celebrities first. ``g`` defaults
    to the base world's stream."""
    ids = world.base_ids if people is None else np.asarray(people, dtype=np.int64)
    table = world.table_at(at)
    g = rng(world.seed, STREAM_RENDER) if g is None else g
    parts = []
    for grp, aug in ((CELEBRITY, cfg.augment), (MINORITY, cfg.minority_augment)):
        sel = ids[world.group[ids] == grp]
        if len(sel) == 0:
            continue
        if cfg.style == "bioR":
            from factlab.text.bior import render_bior

            parts.append(render_bior(table, sel, templates, aug, g, cfg.bior))
        else:
            parts.append(render_bios(table, sel, templates, aug, g))
    if not parts:
        A = len(world.attributes)
        return Docs([], np.zeros(0, np.int32), np.zeros(0, np.int32),
                    np.zeros((0, A, 2), np.int32), world.attributes)
    return Docs.concat(parts)


def updated_people(world, experience: int) -> np.ndarray:
    """People with at least one value changed in ``experience`` (ascending ids)."""
    return np.unique(world.updates.of(experience).person).astype(np.int64)


def cohort_bios(world, cfg: RenderConfig, templates: TemplateSet, experience: int) -> Docs:
    return render(world, cfg, templates, world.ids(arrival=experience), at=experience,
                  g=experience_rng(world.seed, experience, COHORT))


def update_bios(world, cfg: RenderConfig, templates: TemplateSet, experience: int) -> Docs:
    """The whole bios of the people updated in ``experience``, rewritten with the values
    they have from then on."""
    return render(world, cfg, templates, updated_people(world, experience), at=experience,
                  g=experience_rng(world.seed, experience, UPDATE))


def paraphrase_draws(world, templates: TemplateSet) -> QA:
    """One held-out phrasing per (person, attribute) for everyone, drawn per arrival
    group (base: stream 5 as always; cohort t: a stream of its own), so a person's phrasing
    never depends on who else is asked, on later cohorts or on updates."""
    parts = []
    for t in sorted(set(world.arrival.tolist())):
        ids = world.ids(arrival=t)
        g = rng(world.seed, STREAM_PARAPHRASE) if t == 0 else \
            np.random.default_rng([world.seed, STREAM_PARAPHRASE, t])
        parts.append((ids, g))
    table = world.people
    out = [qa_pairs(table, ids, templates, paraphrase=True, g=g) for ids, g in parts]
    return out[0] if len(out) == 1 else QA(
        np.concatenate([q.person for q in out]), np.concatenate([q.attribute for q in out]),
        np.concatenate([q.template for q in out]), [x for q in out for x in q.question],
        [x for q in out for x in q.answer], table.attributes, True)


def qa(world, templates: TemplateSet, people=None, *, at: int = 0, paraphrase: bool = False,
       all_paraphrases: bool = False) -> QA:
    """QA pairs for ``people`` (default: the base world's) with the answers they have after
    experience ``at``: the canonical question, or held-out paraphrases — one seeded draw per
    (person, attribute), or all of them."""
    ids = world.base_ids if people is None else np.asarray(people, dtype=np.int64)
    table = world.table_at(at)
    if paraphrase and not all_paraphrases:
        draws = paraphrase_draws(world, templates)
        keep = np.isin(draws.person, ids)
        idx = np.flatnonzero(keep).tolist()
        answers = draws.answer
        if table is not world.people:  # same phrasing, the answer of time `at`
            answers = [table.pools[a][c] for a, c in zip(
                draws.attribute.tolist(), table.codes[draws.person, draws.attribute].tolist())]
        if keep.all():
            return QA(draws.person, draws.attribute, draws.template, draws.question, answers,
                      draws.attributes, True)
        return QA(draws.person[keep], draws.attribute[keep], draws.template[keep],
                  [draws.question[i] for i in idx], [answers[i] for i in idx],
                  draws.attributes, True)
    return qa_pairs(table, ids, templates, paraphrase=paraphrase)
