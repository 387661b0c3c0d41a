"""User fact files: rows of ``entity, attribute, value`` in JSONL or CSV.

Every bad row stops the read with one error naming file, line and problem; nothing is
written. A repeated identical row is harmless; the same entity and attribute with two
different values is a conflict.

The attribute ``pronoun`` is not a fact: ``Marie Curie,pronoun,she`` says how bios refer
to the entity after its first mention (he, she, they or it). Entities without one are
"it" (a fact file's entities are mostly things; a person's file should say so).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from factlab.errors import FactlabError
from factlab.world.people import IT, PRONOUNS, Table

COLUMNS = ("entity", "attribute", "value")
PRONOUN = "pronoun"  # the reserved attribute (case-insensitive)


def _decode_lines(path: Path, raw: bytes) -> list[str]:
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FactlabError(f"{path}:{i}: not UTF-8 text (byte 0x{line[e.start]:02x} "
                               f"at column {e.start + 1})") from None
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    return out


def _rows_jsonl(path: Path, lines: list[str]):
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactlabError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise FactlabError(f"{path}:{i}: expected a JSON object with keys "
                               f"{', '.join(COLUMNS)}")
        yield i, obj


def _rows_csv(path: Path, lines: list[str]):
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        header = next(reader)
    except StopIteration:
        raise FactlabError(f"{path}: empty file (expected a header: entity,attribute,value)") from None
    header = [h.strip().lower() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise FactlabError(f"{path}:1: header lacks column {missing[0]!r} "
                           f"(need {', '.join(COLUMNS)})")
    col = {c: header.index(c) for c in COLUMNS}
    try:
        for row in reader:
            i = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise FactlabError(f"{path}:{i}: {len(row)} columns, header has {len(header)}")
            yield i, {c: row[col[c]] for c in COLUMNS}
    except csv.Error as e:
        raise FactlabError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def read_facts(path: str | Path, *, pronouns: dict[str, str] | None = None
               ) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """Entities and attributes in order of first appearance, and the fact mapping.
    ``pronoun`` rows are not facts: they go to ``pronouns`` (entity -> he / she / they /
    it) when a dict is given, else they are checked and dropped."""
    pronouns = {} if pronouns is None else pronouns
    path = Path(path)
    if not path.is_file():
        raise FactlabError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise FactlabError(f"{path}: unknown fact file type {suffix!r} (use .jsonl or .csv)")
    lines = _decode_lines(path, path.read_bytes())
    rows = _rows_csv(path, lines) if suffix == ".csv" else _rows_jsonl(path, lines)
    entities: dict[str, None] = {}
    attributes: dict[str, None] = {}
    facts: dict[tuple[str, str], str] = {}
    where: dict[tuple[str, str], int] = {}
    for i, obj in rows:
        vals = {}
        for c in COLUMNS:
            if c not in obj:
                raise FactlabError(f"{path}:{i}: missing column {c!r}")
            v = obj[c]
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise FactlabError(f"{path}:{i}: {c} must be text, got {type(v).__name__}")
            v = str(v).strip()
            if not v:
                raise FactlabError(f"{path}:{i}: empty {c}")
            if "\n" in v or "\r" in v:
                raise FactlabError(f"{path}:{i}: {c} contains a line break")
            if c == "attribute" and any(ch in v for ch in "{}[]"):
                raise FactlabError(f"{path}:{i}: attribute {v!r} contains a brace or bracket")
            vals[c] = v
        key = (vals["entity"], vals["attribute"])
        if key[1].lower() == PRONOUN:
            p = vals["value"].lower()
            if p not in PRONOUNS:
                raise FactlabError(f"{path}:{i}: pronoun {vals['value']!r} of {key[0]!r}: "
                                   f"choose one of {', '.join(PRONOUNS)}")
            if pronouns.get(key[0], p) != p:
                raise FactlabError(f"{path}:{i}: {key[0]!r} has two pronouns: "
                                   f"{pronouns[key[0]]!r} and {p!r}")
            pronouns[key[0]] = p
            continue
        if key in facts and facts[key] != vals["value"]:
            raise FactlabError(
                f"{path}:{i}: entity {key[0]!r} has two values for {key[1]!r}: "
                f"{facts[key]!r} (line {where[key]}) and {vals['value']!r}")
        facts.setdefault(key, vals["value"])
        where.setdefault(key, i)
        entities.setdefault(key[0], None)
        attributes.setdefault(key[1], None)
    if len(entities) < 2:
        raise FactlabError(f"{path}: needs facts about at least 2 entities, found {len(entities)}")
    return list(entities), list(attributes), facts


def pronoun_codes(entities, pronouns: dict[str, str] | None = None) -> np.ndarray:
    """(n,) int8 pronoun codes of ``entities``: the file's ``pronoun`` rows, else "it"."""
    pronouns = pronouns or {}
    return np.array([PRONOUNS.index(pronouns[e]) if e in pronouns else IT for e in entities],
                    dtype=np.int8)


def facts_table(entities, attributes, facts, pronouns: dict[str, str] | None = None) -> Table:
    """The same columnar :class:`Table` that sampled worlds use (pronouns from the file's
    ``pronoun`` rows, else "it")."""
    pools, codes = [], np.full((len(entities), len(attributes)), -1, dtype=np.int32)
    for a, attr in enumerate(attributes):
        index: dict[str, int] = {}
        for e, ent in enumerate(entities):
            v = facts.get((ent, attr))
            if v is not None:
                codes[e, a] = index.setdefault(v, len(index))
        pools.append(list(index))
    return Table(list(entities), pronoun_codes(entities, pronouns), tuple(attributes),
                 codes, tuple(pools))
