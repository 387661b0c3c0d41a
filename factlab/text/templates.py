"""Sentence and question templates: syntax, validation, compilation.

Syntax of a sentence template (one attribute per sentence)::

    "{subj} [was|were] born on {value}."

``{subj}`` subject (the name or he/she/they/it), ``{poss}`` his/her/their/its, ``{obj}``
him/her/them/it, ``{refl}`` himself/herself/themselves/itself, ``{value}`` the attribute value,
``[singular|plural]`` verb agreement (plural only for "they"). ``{name}`` is accepted as an
alias of ``{subj}`` in user template files. Question templates use ``{name}`` only.

Compiling a template for a *mode* (who the subject is) gives a list of literal strings and
slots (:data:`NAME`, :data:`NAME_POSS`, :data:`VALUE`); the vectorised renderer in
:mod:`factlab.text.bios` turns those lists into index arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from factlab.errors import FactlabError
from factlab.world.people import ATTRIBUTES, PRONOUNS

TOKEN = re.compile(r"\{(\w*)\}|\[([^\[\]|{}]*)\|([^\[\]|{}]*)\]")
SENTENCE_PLACEHOLDERS = {"subj", "poss", "obj", "refl", "value", "name"}

# slots of a compiled template (0 is "nothing", used for padding)
NONE, NAME, NAME_POSS, VALUE = 0, 1, 2, 3

# PRONOUNS (codes 0, 1, 2; -1 means "no pronoun") are world data; their forms are text.
FORMS = {  # subj, poss, obj, refl, plural
    "he": ("he", "his", "him", "himself", False),
    "she": ("she", "her", "her", "herself", False),
    "they": ("they", "their", "them", "themselves", True),
    "it": ("it", "its", "it", "itself", False),
}

# Who the subject of a sentence is:
PRON, NAME_FIRST, FULL = 0, 1, 2  # pronoun | full name, pronoun possessives | name everywhere
N_PRONOUN_SLOTS = len(PRONOUNS) + 1  # he, she, they, it, none
N_MODES = 3 * N_PRONOUN_SLOTS


def mode_index(kind: int, pronoun: int) -> int:
    """Index of (kind, pronoun code) in the compiled arrays; pronoun -1 maps to the last
    slot."""
    return kind * N_PRONOUN_SLOTS + (N_PRONOUN_SLOTS - 1 if pronoun < 0 else pronoun)


def tokens(template: str) -> list[tuple]:
    """Split into ("lit", text) / ("ph", name) / ("agree", singular, plural)."""
    out, pos = [], 0
    for m in TOKEN.finditer(template):
        if m.start() > pos:
            out.append(("lit", template[pos:m.start()]))
        if m.group(1) is not None:
            out.append(("ph", m.group(1)))
        else:
            out.append(("agree", m.group(2), m.group(3)))
        pos = m.end()
    if pos < len(template):
        out.append(("lit", template[pos:]))
    return out


def check_sentence(template: str, where: str) -> None:
    """Raise a FactlabError naming ``where`` if ``template`` is not a valid sentence template."""
    if not isinstance(template, str) or not template.strip():
        raise FactlabError(f"{where}: template must be a non-empty string")
    if "\n" in template or "\r" in template:
        raise FactlabError(f"{where}: template contains a line break: {template!r}")
    toks = tokens(template)
    names = [t[1] for t in toks if t[0] == "ph"]
    for lit in (t[1] for t in toks if t[0] == "lit"):
        if any(c in lit for c in "{}[]"):
            raise FactlabError(f"{where}: stray brace or bracket in {template!r}")
    bad = [n for n in names if n not in SENTENCE_PLACEHOLDERS]
    if bad:
        raise FactlabError(f"{where}: unknown placeholder {{{bad[0]}}} in {template!r}")
    if names.count("value") != 1:
        raise FactlabError(f"{where}: needs exactly one {{value}} in {template!r}")
    if names.count("subj") + names.count("name") != 1:
        raise FactlabError(f"{where}: needs exactly one {{subj}} (or {{name}}) in {template!r}")


def check_question(template: str, where: str) -> None:
    if not isinstance(template, str) or not template.strip():
        raise FactlabError(f"{where}: question must be a non-empty string")
    names = [t[1] for t in tokens(template) if t[0] == "ph"]
    if names != ["name"]:
        raise FactlabError(f"{where}: a question needs exactly one {{name}} and no other "
                           f"placeholder: {template!r}")


def compile_sentence(template: str, kind: int, pronoun: int, value_slot: int = VALUE) -> list:
    """Literal strings and slots for one mode; adjacent literals merged, first letter capitalised."""
    if pronoun < 0 or kind == FULL:
        subj, poss, obj, refl, plural = NAME, NAME_POSS, NAME, NAME, False
    else:
        subj, poss, obj, refl, plural = FORMS[PRONOUNS[pronoun]]
        if kind == NAME_FIRST:
            subj, plural = NAME, False
    sub = {"subj": subj, "name": subj, "poss": poss, "obj": obj, "refl": refl,
           "value": value_slot}
    parts: list = []
    for tok in tokens(template):
        if tok[0] == "lit":
            piece = tok[1]
        elif tok[0] == "agree":
            piece = tok[2] if plural else tok[1]
        else:
            piece = sub[tok[1]]
        if isinstance(piece, str) and parts and isinstance(parts[-1], str):
            parts[-1] += piece
        elif piece != "":
            parts.append(piece)
    if parts and isinstance(parts[0], str):
        parts[0] = parts[0][:1].upper() + parts[0][1:]
    return parts


def render_question(template: str, name: str) -> str:
    return template.replace("{name}", name)


@dataclass
class TemplateSet:
    """Per-attribute sentence templates, the canonical (training) question and held-out
    paraphrases. Attribute order is the canonical order of the world."""

    attributes: tuple[str, ...]
    sentences: dict[str, list[str]]
    question: dict[str, str]
    paraphrases: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {a: {"sentences": list(self.sentences[a]), "question": self.question[a],
                    "paraphrases": list(self.paraphrases.get(a, []))} for a in self.attributes}

    @classmethod
    def from_dict(cls, data: dict, source: str, attributes=None) -> TemplateSet:
        """Validate a ``{attribute: {sentences, question, paraphrases}}`` mapping."""
        if not isinstance(data, dict):
            raise FactlabError(f"{source}: expected a mapping of attribute -> templates")
        attributes = tuple(attributes) if attributes is not None else tuple(data)
        unknown = [a for a in data if a not in attributes]
        if unknown:
            raise FactlabError(f"{source}: templates for unknown attribute {unknown[0]!r} "
                               f"(attributes: {', '.join(attributes)})")
        sentences, question, paraphrases = {}, {}, {}
        for a in attributes:
            entry = data.get(a)
            if entry is None:
                entry = generic_entry(a)
            if not isinstance(entry, dict):
                raise FactlabError(f"{source}: {a}: expected a mapping with sentences/question")
            extra = set(entry) - {"sentences", "question", "paraphrases"}
            if extra:
                raise FactlabError(f"{source}: {a}: unknown key {sorted(extra)[0]!r}")
            gen = generic_entry(a)
            sents = entry.get("sentences", gen["sentences"])
            if not isinstance(sents, list) or not sents:
                raise FactlabError(f"{source}: {a}.sentences: expected a non-empty list")
            for i, t in enumerate(sents):
                check_sentence(t, f"{source}: {a}.sentences[{i}]")
            q = entry.get("question", gen["question"])
            check_question(q, f"{source}: {a}.question")
            paras = entry.get("paraphrases", gen["paraphrases"])
            if not isinstance(paras, list):
                raise FactlabError(f"{source}: {a}.paraphrases: expected a list")
            for i, t in enumerate(paras):
                check_question(t, f"{source}: {a}.paraphrases[{i}]")
            if q in paras:
                raise FactlabError(f"{source}: {a}: the training question is also a paraphrase")
            sentences[a], question[a], paraphrases[a] = list(sents), q, list(paras)
        return cls(attributes, sentences, question, paraphrases)


def label(attribute: str) -> str:
    return attribute.replace("_", " ").strip()


# how an attribute's name reads: a verb phrase ("surveyed by", "born in", "founded"), a
# plural noun ("moons") or a singular noun (everything else)
_PREPOSITIONS = {"about", "after", "as", "at", "by", "for", "from", "in", "into", "of", "on",
                 "to", "under", "with", "within"}
_PARTICIPLES = {"born", "made", "built", "written", "known", "held", "run", "led", "taught",
                "sold", "given", "taken", "drawn", "grown", "shown", "seen", "done", "won",
                "bought", "brought", "kept", "owned", "paid", "sent", "told", "chosen",
                "driven", "spoken", "begun", "sung", "set", "put", "found", "based", "named"}
_SINGULAR_S = ("ss", "us", "is", "ics", "ous", "news", "series", "species", "status", "alias",
               "atlas", "canvas", "bias", "lens", "gas")


def attribute_form(attribute: str) -> str:
    """``verb`` (a verb phrase: "surveyed by", "born in", "founded"), ``plural`` (a plural
    noun: "moons", "parents") or ``noun`` — how generic templates phrase the attribute."""
    words = label(attribute).lower().split()
    if not words:
        return "noun"
    first, last = words[0], words[-1]
    if first in ("is", "was", "has", "had", "are", "were"):
        return "verb"
    if (len(words) > 1 and last in _PREPOSITIONS) or first in _PARTICIPLES or (
            first.endswith("ed") and len(first) > 4 and (len(words) == 1 or
                                                         last in _PREPOSITIONS)):
        return "verb"
    head = words[:words.index("of")][-1] if "of" in words[1:] else last  # "number of x"
    if head.endswith("s") and not head.endswith(_SINGULAR_S) and len(head) > 3:
        return "plural"
    return "noun"


def generic_entry(attribute: str) -> dict:
    """Templates for an attribute nobody wrote templates for (user fact files). Every
    sentence names the entity once, as its subject (``{subj}``: the name, or he / she /
    they / it after a bio's first sentence; never a possessive of it), reads as English
    whether the attribute's name is a singular noun ("home port"), a plural one ("moons")
    or a verb phrase ("surveyed by"), and agrees with "they"."""
    lab = label(attribute)
    form = attribute_form(attribute)
    if form == "verb":
        words = lab.split()
        first = words[0].lower()
        rest = " ".join(words[1:]) if first in ("is", "was", "are", "were", "has", "had") \
            and len(words) > 1 else lab
        if first in ("has", "had"):  # "has part": what it has
            verb = "[has|have]" if first == "has" else "had"
            do = "does" if first == "has" else "did"
            sentences = [f"{{subj}} {verb} {rest} {{value}}.",
                         f"According to the records, {{subj}} {verb} {rest} {{value}}.",
                         f"It is recorded that {{subj}} {verb} {rest} {{value}}.",
                         f"As the records show, {{subj}} {verb} {rest} {{value}}.",
                         f"The records say that {{subj}} {verb} {rest} {{value}}."]
            return {"sentences": sentences,
                    "question": f"What {rest} {do} {{name}} have?",
                    "paraphrases": [f"Tell me what {rest} {{name}} {verb.strip('[').split('|')[0]}?",
                                    f"Do you know what {rest} {{name}} "
                                    f"{verb.strip('[').split('|')[0]}?",
                                    f"According to the records, what {rest} {do} {{name}} "
                                    f"have?"]}
        aux, q = ("[is|are]", "is") if first in ("is", "are") else ("[was|were]", "was")
        return {
            "sentences": [
                f"{{subj}} {aux} {rest} {{value}}.",
                f"According to the records, {{subj}} {aux} {rest} {{value}}.",
                f"It is recorded that {{subj}} {aux} {rest} {{value}}.",
                f"As the records show, {{subj}} {aux} {rest} {{value}}.",
                f"The records say that {{subj}} {aux} {rest} {{value}}.",
            ],
            "question": f"What {q} {{name}} {rest}?",
            "paraphrases": [
                f"Tell me what {{name}} {q} {rest}?",
                f"Do you know what {{name}} {q} {rest}?",
                f"According to the records, what {q} {{name}} {rest}?",
            ],
        }
    be = "are" if form == "plural" else "is"  # the question's verb
    return {
        # the entity is always the grammatical subject: after the first sentence it is a
        # pronoun ("it has", never "the height of it")
        "sentences": [
            f"{{subj}} [has|have] the {lab} {{value}}.",
            f"{{subj}} [is|are] recorded with the {lab} {{value}}.",
            f"As for {lab}, {{subj}} [has|have] {{value}}.",
            f"According to the records, {{subj}} [has|have] the {lab} {{value}}.",
            f"The records show that {{subj}} [has|have] the {lab} {{value}}.",
        ],
        "question": f"What {be} the {lab} of {{name}}?",
        "paraphrases": [
            f"Which {lab} does {{name}} have?",
            f"Tell me the {lab} of {{name}}?",
            f"Do you know {{name}}'s {lab}?",
        ],
    }


def _data(name: str) -> dict:
    text = resources.files("factlab.text").joinpath("data", name).read_text("utf-8")
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def bios_templates() -> TemplateSet:
    """The shipped bioS templates (about 50 per attribute) and the six questions."""
    sents, qs = _data("bio_templates.yaml"), _data("questions.yaml")
    data = {a: {"sentences": sents[a], "question": qs["canonical"][a],
                "paraphrases": qs["paraphrase"][a]} for a in ATTRIBUTES}
    return TemplateSet.from_dict(data, "factlab/text/data", ATTRIBUTES)


# Closing sentences of the `reverse` augmentation: the name comes after all attributes.
NAME_SENTENCES = [
    "{poss} full name is {value}.",
    "{subj} [goes|go] by the name {value}.",
    "{subj} [is|are] {value}.",
    "This person is {value}.",
    "{poss} name is {value}.",
]
