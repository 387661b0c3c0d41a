"""A world on disk.

::

    WORLD/
      manifest.json         seed, resolved config, counts, sha256 of every file below
      templates.yaml        the templates the world was rendered with
      people.jsonl          id, name, pronoun, split (train/test), [group], attributes
      unknown_people.jsonl  sampled like people, never in any document (hallucination probes)
      bios.jsonl            id, person, name, entry, text, spans {attribute: [start, end]}
      qa.jsonl              the canonical questions of everyone, tagged with the split
      qa_paraphrase.jsonl   held-out question phrasings (never for training)

Every ``.jsonl`` loads with ``datasets.load_dataset("json", data_files=...)``. The same seed
and config give byte-identical files (no timestamps; fixed key order). The directory is
built aside and moved into place whole; an existing one is replaced only with ``force``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from factlab import __version__
from factlab.config import build
from factlab.errors import FactlabError
from factlab.io import (atomic_dir, atomic_write_text, read_jsonl, sha256_file, write_jsonl,
                        write_lines)
from factlab.text.documents import Docs
from factlab.text.templates import PRONOUNS, TemplateSet
from factlab.world.config import WorldConfig
from factlab.world.facts import facts_table
from factlab.world.people import MINORITY, TEST, Table, World

FORMAT = 1
FILES = ("templates.yaml", "people.jsonl", "unknown_people.jsonl", "bios.jsonl", "qa.jsonl",
         "qa_paraphrase.jsonl")


def _people_records(table: Table, split=None, group=None):
    attrs = table.attributes
    for i, name in enumerate(table.names):
        p = int(table.pronoun[i])
        rec = {"id": i, "name": name, "pronoun": PRONOUNS[p] if p >= 0 else None}
        if split is not None:
            rec["split"] = "test" if split[i] == TEST else "train"
        if group is not None:
            rec["group"] = "minority" if group[i] == MINORITY else "celebrity"
        row = table.codes[i]
        for a, attr in enumerate(attrs):
            rec[attr] = table.pools[a][row[a]] if row[a] >= 0 else None
        yield rec


def save_world(world: World, out: str | Path, *, force: bool = False) -> dict:
    """Render and write the world; returns the manifest."""
    bios = world.bios()
    qa = world.qa()
    para = world.qa(paraphrase=True)
    celebrity = bool(world.config.minority)
    names = world.people.names
    with atomic_dir(out, force=force) as tmp:
        atomic_write_text(tmp / "templates.yaml", yaml.safe_dump(
            world.templates.to_dict(), sort_keys=False, allow_unicode=True, width=1000))
        write_jsonl(tmp / "people.jsonl", _people_records(
            world.people, world.split, world.group if celebrity else None))
        write_jsonl(tmp / "unknown_people.jsonl", _people_records(world.unknown))
        write_lines(tmp / "bios.jsonl", bios.jsonl(names))
        write_lines(tmp / "qa.jsonl", qa.jsonl(world.split, names))
        write_lines(tmp / "qa_paraphrase.jsonl", para.jsonl(world.split, names))
        manifest = {
            "factlab": __version__,
            "format": FORMAT,
            "seed": world.config.seed,
            "source": world.source,
            "config": world.config.model_dump(mode="json"),
            "facts_sha256": world.facts_sha256,
            "attributes": list(world.attributes),
            "counts": {
                "people": len(world.people),
                "p_train": int((world.split != TEST).sum()),
                "p_test": int((world.split == TEST).sum()),
                "unknown": len(world.unknown),
                "bios": len(bios),
                "qa": len(qa),
                "qa_paraphrase": len(para),
            },
            "files": {f: sha256_file(tmp / f) for f in FILES},
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FactlabError(f"{path}: no such world directory")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise FactlabError(f"{path}: not a factlab world (no manifest.json)")
    try:
        return json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FactlabError(f"{mf}: not valid JSON ({e.msg})") from None


def _table(records: list[dict], attrs: tuple[str, ...]) -> Table:
    names = [r["name"] for r in records]
    facts = {(r["name"], a): r[a] for r in records for a in attrs if r.get(a) is not None}
    t = facts_table(names, attrs, facts) if names else Table(
        [], np.zeros(0, np.int8), attrs, np.zeros((0, len(attrs)), np.int32),
        tuple([] for _ in attrs))
    t.pronoun = np.array([PRONOUNS.index(r["pronoun"]) if r.get("pronoun") else -1
                          for r in records], dtype=np.int8)
    return t


def load_world(path: str | Path, *, verify: bool = True) -> World:
    """Read a world directory back (bios from disk, not re-rendered)."""
    path = Path(path)
    manifest = read_manifest(path)
    for f in FILES:
        if not (path / f).is_file():
            raise FactlabError(f"{path}: missing {f}")
        if verify and sha256_file(path / f) != manifest["files"].get(f):
            raise FactlabError(f"{path / f}: content does not match the manifest's sha256 "
                               f"(the world was modified)")
    cfg = build(WorldConfig, manifest["config"], source=str(path / "manifest.json"))
    attrs = tuple(manifest["attributes"])
    people_recs = read_jsonl(path / "people.jsonl")
    people = _table(people_recs, attrs)
    unknown = _table(read_jsonl(path / "unknown_people.jsonl"), attrs)
    split = np.array([TEST if r["split"] == "test" else 0 for r in people_recs], dtype=np.int8)
    group = np.array([MINORITY if r.get("group") == "minority" else 0 for r in people_recs],
                     dtype=np.int8)
    templates = TemplateSet.from_dict(yaml.safe_load((path / "templates.yaml").read_text("utf-8")),
                                      str(path / "templates.yaml"), attrs)
    world = World(cfg, people, split, group, unknown, templates, source=manifest["source"],
                  facts_sha256=manifest.get("facts_sha256"))
    bios = read_jsonl(path / "bios.jsonl")
    spans = np.full((len(bios), len(attrs), 2), -1, dtype=np.int32)
    for d, r in enumerate(bios):
        for a, attr in enumerate(attrs):
            s = r["spans"].get(attr)
            if s is not None:
                spans[d, a] = s
    world._cache["bios"] = Docs([r["text"] for r in bios],
                                np.array([r["person"] for r in bios], np.int32),
                                np.array([r["entry"] for r in bios], np.int32), spans, attrs)
    return world
