"""Augmentation names (spec §1): ``single``, ``multiM``, ``+permute[P]``, ``+couple[P]``,
``+fullname``, ``+reverse``, combined with ``+`` — e.g. ``multi5+permute+fullname``.

- ``multiM``: M entries per person, every sentence's template re-drawn per entry.
- ``permute``: the sentences shuffled per entry; on ``single``, ``permuteP`` means P
  shuffled copies of the *same* sentences.
- ``couple``: three fixed pairs (birth date+city, university+major, employer+company city)
  kept together, the order of the pairs shuffled per entry (``coupleP`` on single as above).
- ``fullname``: every pronoun replaced by the full name.
- ``reverse``: pronouns throughout and the full name in a closing sentence, after all the
  attributes (Part 3.2's inverse-search data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from factlab.errors import FactlabError

# The 16 named bioS datasets of the paper, then couple and reverse variants.
NAMED = (
    "single", "single+fullname",
    "single+permute1", "single+permute2", "single+permute5",
    "single+permute1+fullname", "single+permute2+fullname", "single+permute5+fullname",
    "multi2", "multi5", "multi2+permute", "multi5+permute",
    "multi2+fullname", "multi5+fullname", "multi2+permute+fullname", "multi5+permute+fullname",
    "couple1", "couple2", "couple5",
    "single+reverse", "multi5+reverse", "multi5+permute+reverse",
)
_PART = re.compile(r"^(single|multi|permute|couple|fullname|reverse)(\d*)$")


@dataclass(frozen=True)
class Augment:
    entries: int  # bio entries per person
    redraw: bool  # templates re-drawn per entry (multiM) or fixed per person (single)
    order: str  # "canonical" | "permute" | "couple"
    fullname: bool
    reverse: bool

    @property
    def name(self) -> str:
        parts = [f"multi{self.entries}" if self.redraw else "single"]
        if self.order != "canonical":
            parts.append(self.order if self.redraw else f"{self.order}{self.entries}")
        if self.fullname:
            parts.append("fullname")
        if self.reverse:
            parts.append("reverse")
        return "+".join(parts)


def parse_augment(name: str) -> Augment:
    """Parse an augmentation name; any problem is one error naming the offending part."""
    def bad(msg: str) -> FactlabError:
        return FactlabError(f"augment {name!r}: {msg} (known: {', '.join(NAMED[:6])}, ...; "
                            f"grammar: single|multiM [+permute[P]] [+couple[P]] [+fullname] "
                            f"[+reverse])")

    if not isinstance(name, str) or not name.strip():
        raise bad("empty name")
    parts = [p.strip() for p in name.strip().split("+")]
    seen: set[str] = set()
    base, entries, redraw = None, 1, False
    order, fullname, reverse = "canonical", False, False
    for i, part in enumerate(parts):
        m = _PART.match(part)
        if not m:
            raise bad(f"unknown part {part!r}")
        word, num = m.group(1), m.group(2)
        if word in seen:
            raise bad(f"{word!r} given twice")
        seen.add(word)
        n = int(num) if num else None
        if word in ("single", "multi"):
            if i != 0:
                raise bad(f"{word!r} must come first")
            base = word
            if word == "single" and n is not None:
                raise bad("'single' takes no number")
            if word == "multi":
                if not n or n < 1:
                    raise bad("multi needs a number of entries, e.g. multi5")
                entries, redraw = n, True
        elif word in ("permute", "couple"):
            if order != "canonical":
                raise bad("permute and couple cannot be combined")
            order = word
            if base == "multi":
                if n is not None:
                    raise bad(f"on multiM use plain '{word}' (entries come from multiM)")
            else:
                if n is not None and n < 1:
                    raise bad(f"{word}{n}: need at least one entry")
                entries = n or 1
        elif word in ("fullname", "reverse"):
            if n is not None:
                raise bad(f"{word!r} takes no number")
            fullname |= word == "fullname"
            reverse |= word == "reverse"
    if fullname and reverse:
        raise bad("fullname and reverse contradict each other")
    if entries > 1000:
        raise bad(f"{entries} entries per person is more than 1000")
    return Augment(entries, redraw, order, fullname, reverse)
