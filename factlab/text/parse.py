"""Read facts back out of bios written with a world's sentence templates: the reader that
scores generated pseudo-bios (generative replay writes them; are their facts true?).

    parser = BioParser(corpus.templates, corpus.world.people.pools)
    facts = parser.parse(text)      # [(name, attribute, value, in_pool), ...]

Every sentence template of every attribute is compiled, for each way the renderer can
write it (name first, pronoun he / she / they / it, name everywhere), into an anchored regular
expression; the name slot matches a run of capitalised words (the caller looks the name
up), the value slot a value of the attribute's pool (when the pool is not huge) or,
failing that, any text up to the template's end. Text is read left to right: at each
position the longest match of any template wins (of equally long ones, a pool value, then
the shortest value: the template that explains more of the sentence); a sentence with a
name sets the
person the following pronoun sentences are about; a sentence no template reads is skipped
to the next ". " and counted. bioS with its augmentations (multi, permute, fullname) is
read exactly (``tests/test_parse.py`` recovers every fact of real bios); ``+reverse``,
bioR and rewritten text are not.

No maintained package reads text back through a template grammar, so this is written
here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from factlab.text.templates import FORMS, FULL, NAME, NAME_FIRST, NAME_POSS, PRON, VALUE, \
    compile_sentence

MAX_POOL = 5000  # larger pools (bioS birth dates) are matched loosely
LOOSE_NAME = r"(?!(?:He|She|They|It)\b)[A-Z][\w'\-.]*(?: [A-Z][\w'\-.]*){0,5}"


@dataclass(frozen=True)
class Parsed:
    name: str | None  # the person the sentence is about (None: no name seen yet)
    attribute: str
    value: str
    in_pool: bool  # the value is one of the attribute's pool


def _alt(strings) -> str:
    return "|".join(re.escape(s) for s in sorted(set(strings), key=len, reverse=True))


class BioParser:
    def __init__(self, templates, pools):
        self.attributes = tuple(templates.attributes)
        self.pools = {a: set(p) for a, p in zip(self.attributes, pools)}
        # (pattern, attribute, strict, its longest literal: a cheap test before matching)
        self._rx: list[tuple[re.Pattern, str, bool, str]] = []
        seen = set()
        for a, pool in zip(self.attributes, pools):
            strict_value = f"(?P<value>{_alt(pool)})" if 0 < len(pool) <= MAX_POOL else None
            for t in templates.sentences[a]:
                for kind, pronoun in [(FULL, 0)] + [(k, p) for k in (NAME_FIRST, PRON)
                                                    for p in range(len(FORMS))]:
                    parts = compile_sentence(t, kind, pronoun)
                    for vrx, strict in ([(strict_value, True)] if strict_value else []) + \
                            [(None, False)]:
                        src = self._regex(parts, LOOSE_NAME, vrx)
                        if src not in seen:
                            seen.add(src)
                            lit = max((x for x in parts if isinstance(x, str)), key=len,
                                      default="")
                            self._rx.append((re.compile(src), a, strict, lit.strip()))

    @staticmethod
    def _regex(parts, name_rx: str, value_rx: str | None) -> str:
        out, named = [], False
        for i, x in enumerate(parts):
            if isinstance(x, str):
                out.append(re.escape(x))
            elif x in (NAME, NAME_POSS):
                g = f"(?P<name>{name_rx})" if not named else f"(?:{name_rx})"
                named = True
                out.append(g + ("'s" if x == NAME_POSS else ""))
            elif x == VALUE:
                # loosely: any text within one sentence (no ". " inside)
                out.append(value_rx or r"(?P<value>(?:[^.]|\.(?!\s))+?)")
        return "".join(out) + r"(?=\s|$)"

    def parse(self, text: str) -> tuple[list[Parsed], int]:
        """The facts stated by ``text`` in order, and the number of sentences no template
        reads."""
        facts: list[Parsed] = []
        unread, pos, who = 0, 0, None
        n = len(text)
        while pos < n:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos >= n:
                break
            best, key = None, None
            window = text[pos:pos + 400]
            for rx, a, strict, lit in self._rx:
                if lit not in window:
                    continue
                m = rx.match(text, pos)
                if m:
                    k = (m.end(), strict, -len(m.group("value")))
                    if best is None or k > key:
                        best, key = (m, a), k
            if best is None:
                unread += 1
                j = text.find(". ", pos)
                pos = n if j < 0 else j + 2
                continue
            m, a = best
            if m.groupdict().get("name"):
                who = m.group("name")
            v = m.group("value")
            facts.append(Parsed(who, a, v, v in self.pools[a]))
            pos = m.end()
        return facts, unread
