"""Facts to store in a memory: generated random facts, a world's facts, a user's fact file.

Everything here returns a :class:`factlab.text.qa.QA` (questions, answers, which entity and
attribute each is about), the shape the encoder, the evaluator and the scorer read.

- :func:`random_answers`: seeded random strings (the random-label experiment's 32 upper-case
  letters and digits, e.g. ``OKCNLRZ0JTVT1SFNEMYJYM7UDTDQPKNQ``);
- :func:`fresh_names`: full names from a world's name pools that no one in it (people,
  unknown people) has, so a fact about them is new to the backbone (without a world: from
  every shipped name);
- :func:`attribute_facts`: "What is the {attribute} of {name}?" for names and answers;
- :func:`world_valued_facts`: new names given values of one of a world's attributes
  (drawn from its people's values: the "true answers" of the random-label experiment, of
  the kind the backbone already produces), asked with the world's own question;
- :func:`file_facts`: a user's fact file (``factlab.world.facts``: entity, attribute, value
  rows), asked with the same generic question.
"""

from __future__ import annotations

import numpy as np

from factlab.errors import FactlabError
from factlab.text.qa import QA

ALPHABET = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
QUESTION = "What is the {attribute} of {name}?"


def random_answers(n: int, seed: int, length: int = 32, alphabet=ALPHABET) -> list[str]:
    if n < 0 or length < 1:
        raise FactlabError(f"random answers: need n >= 0 and length >= 1, got {n}, {length}")
    g = np.random.default_rng([seed, 32])
    a = np.asarray(alphabet)
    return ["".join(row) for row in a[g.integers(0, len(a), (n, length))]]


def fresh_names(world, n: int, seed: int, exclude=()) -> list[str]:
    """``n`` distinct names drawn from ``world.names`` (its pools) that are neither a
    person's, an unknown person's nor in ``exclude``; with ``world=None`` (a pretrained
    model outside any world) from every shipped name."""
    if world is None:
        from factlab.world.pools import shipped_name_pools

        pools, taken = shipped_name_pools(), set(exclude)
    else:
        pools = world.names
        taken = set(world.people.names) | set(world.unknown.names) | set(exclude)
    if n > pools.capacity - len(taken):
        raise FactlabError(f"fresh names: the world's name pools hold {pools.capacity} names, "
                           f"{len(taken)} taken; cannot draw {n} more")
    g = np.random.default_rng([seed, 33])
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        for nm in pools.names(g.integers(0, pools.capacity, 2 * (n - len(out)) + 8)):
            if nm not in seen:
                seen.add(nm)
                out.append(nm)
                if len(out) == n:
                    break
    return out


def attribute_facts(names, answers, attribute: str = "access code",
                    question: str = QUESTION) -> QA:
    names, answers = list(names), list(answers)
    if len(names) != len(answers):
        raise FactlabError(f"facts: {len(names)} names but {len(answers)} answers")
    return QA(person=np.arange(len(names), dtype=np.int32),
              attribute=np.zeros(len(names), np.int16),
              template=np.zeros(len(names), np.int16),
              question=[question.format(attribute=attribute, name=nm) for nm in names],
              answer=answers, attributes=(attribute,), heldout=False)


def file_facts(path, question: str = QUESTION) -> tuple[QA, list[str]]:
    """A fact file's rows as questions (and the entity names, by ``QA.person``)."""
    from factlab.world.facts import read_facts

    entities, attributes, facts = read_facts(path)
    index = {e: i for i, e in enumerate(entities)}
    akey = {a: j for j, a in enumerate(attributes)}
    rows = sorted(facts.items(), key=lambda kv: (index[kv[0][0]], akey[kv[0][1]]))
    return QA(person=np.array([index[e] for (e, _), _ in rows], np.int32),
              attribute=np.array([akey[a] for (_, a), _ in rows], np.int16),
              template=np.zeros(len(rows), np.int16),
              question=[question.format(attribute=a, name=e) for (e, a), _ in rows],
              answer=[v for _, v in rows], attributes=tuple(attributes),
              heldout=False), list(entities)


def world_valued_facts(corpus, names, attribute: str, seed: int) -> QA:
    """A fact per name: ``attribute`` (a world attribute, e.g. ``birth_city``) with a value
    drawn from the world's people's values of it, asked with the world's canonical question
    for that attribute (the name put in)."""
    qa = corpus.qa()
    attrs = list(qa.attributes)
    key = attribute.replace(" ", "_")
    if key not in attrs:
        raise FactlabError(f"--values {attribute!r}: the world's attributes are "
                           f"{', '.join(attrs)}")
    j = attrs.index(key)
    rows = np.flatnonzero(np.asarray(qa.attribute) == j)
    people = corpus.people.names
    first = int(rows[0])
    src = people[int(qa.person[first])]
    if src not in qa.question[first]:
        raise FactlabError(f"--values {attribute!r}: the world's question does not name "
                           f"its person")
    template = qa.question[first].replace(src, "{name}")
    g = np.random.default_rng([seed, 34])
    values = [qa.answer[int(i)] for i in g.choice(rows, len(names))]
    names = list(names)
    return QA(person=np.arange(len(names), dtype=np.int32),
              attribute=np.zeros(len(names), np.int16),
              template=np.zeros(len(names), np.int16),
              question=[template.replace("{name}", nm) for nm in names], answer=values,
              attributes=(key.replace("_", " "),), heldout=False)


def city_valued_facts(names, seed: int) -> QA:
    """Outside any world: "What is the birth city of NAME?" answered with a city drawn from
    the shipped city pool (the random-label experiment's "true" answers for a pretrained
    model: the kind of value it already produces)."""
    from factlab.world.pools import shipped_pool

    cities = shipped_pool("cities")
    g = np.random.default_rng([seed, 34])
    return attribute_facts(names, [cities[i] for i in g.integers(0, len(cities), len(names))],
                           attribute="birth city")


def generated_facts(corpus, n: int, values: str | None, seed: int) -> tuple[QA, list[str]]:
    """``n`` new facts about ``n`` names new to ``corpus`` (a world, or None: the shipped
    name pools): 32 random characters each, or with ``values`` a value of that attribute
    (the world's pool; without a world only birth_city, the shipped cities). Returns the
    facts and their names (``memory tune --random``, the recipes' memory stage)."""
    from factlab.errors import FactlabError

    names = fresh_names(corpus.world if corpus is not None else None, n, seed)
    if values is None:
        return attribute_facts(names, random_answers(n, seed)), names
    if corpus is None:
        if values.strip().replace(" ", "_") != "birth_city":
            raise FactlabError(f"--values {values}: without a world (--world DIR) only "
                               f"birth_city (the shipped cities) has values to draw")
        return city_valued_facts(names, seed), names
    return world_valued_facts(corpus, names, values, seed), names
