"""A world directory: a corpus (world + rendering) on disk.

::

    WORLD/
      manifest.json         format, seed, resolved config, counts, sha256 of every file below
      pools.json            every value pool (code = index), the name pools and derived
                            attributes: a loaded world has exactly the codes it was made with
      templates.yaml        the templates the world was rendered with
      people.jsonl          id, name, pronoun, split (train/test), [group], attributes
      unknown_people.jsonl  sampled like people, never in any document (hallucination probes)
      bios.jsonl            id, person, name, entry, text, spans {attribute: [start, end]}
      qa.jsonl              the canonical questions of everyone, tagged with the split
      qa_paraphrase.jsonl   held-out question phrasings (never for training)
      experiences/T/        what experience T adds (only where it adds it):
        people.jsonl          the cohort arriving in T (ids after everyone before them)
        bios.jsonl, qa.jsonl, qa_paraphrase.jsonl   its bios and QA, as above
        updates.jsonl         person, name, attribute, old, new: values changed from T on
        update_bios.jsonl     the updated people's bios rewritten with their values at T
        update_qa.jsonl       their canonical questions answered with the values at T

Every ``.jsonl`` loads with ``datasets.load_dataset("json", data_files=...)``. The same seed
and config give byte-identical files (no timestamps; fixed key order). The directory is
built aside and moved into place whole; an existing one is replaced only with ``force``.
Experiences are added to an existing directory with :func:`save_experiences`: the base
files' bytes never change, only new files and the manifest are written.

Format 2 (this one) stores the pools; format 1 did not, and its loader re-indexed values,
so codes of a loaded world were not those of the world that was made. A format-1
directory is refused with a message saying how to make it again (same seed: same people,
same bios, byte for byte).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from factlab import __version__
from factlab.config import build
from factlab.corpus.config import CorpusConfig
from factlab.corpus.corpus import Corpus
from factlab.errors import FactlabError
from factlab.io import (atomic_dir, atomic_write_text, read_jsonl, sha256_file, write_jsonl,
                        write_lines)
from factlab.text.documents import Docs
from factlab.text.render import updated_people
from factlab.text.templates import TemplateSet
from factlab.world.people import MINORITY, PRONOUNS, TEST, Derived, Table, World
from factlab.world.pools import NamePools
from factlab.world.versions import Updates

FORMAT = 2
FILES = ("pools.json", "templates.yaml", "people.jsonl", "unknown_people.jsonl", "bios.jsonl",
         "qa.jsonl", "qa_paraphrase.jsonl")
COHORT_FILES = ("people.jsonl", "bios.jsonl", "qa.jsonl", "qa_paraphrase.jsonl")
UPDATE_FILES = ("updates.jsonl", "update_bios.jsonl", "update_qa.jsonl")


def _people_records(table: Table, ids, split=None, group=None, arrival=None):
    attrs = table.attributes
    for i in np.asarray(ids).tolist():
        p = int(table.pronoun[i])
        rec = {"id": i, "name": table.names[i], "pronoun": PRONOUNS[p] if p >= 0 else None}
        if split is not None:
            rec["split"] = "test" if split[i] == TEST else "train"
        if group is not None:
            rec["group"] = "minority" if group[i] == MINORITY else "celebrity"
        if arrival is not None:
            rec["arrival"] = int(arrival[i])
        row = table.codes[i]
        for a, attr in enumerate(attrs):
            rec[attr] = table.pools[a][row[a]] if row[a] >= 0 else None
        yield rec


def _pools_json(world: World) -> str:
    nm = world.names
    attrs = world.attributes
    data = {
        "attributes": {a: list(p) for a, p in zip(attrs, world.people.pools)},
        "names": {"first": list(nm.first), "first_gender": list(nm.first_gender),
                  "middle": list(nm.middle), "last": list(nm.last)},
        "derived": {attrs[d.attribute]: {"from": attrs[d.source], "codes": d.codes.tolist()}
                    for d in world.derived},
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def _write_base(c: Corpus, tmp: Path) -> dict:
    w = c.world
    bios, qa, para = c.bios(), c.qa(), c.qa(paraphrase=True)
    base = w.base_ids
    names = w.people.names
    atomic_write_text(tmp / "pools.json", _pools_json(w))
    atomic_write_text(tmp / "templates.yaml", yaml.safe_dump(
        c.templates.to_dict(), sort_keys=False, allow_unicode=True, width=1000))
    write_jsonl(tmp / "people.jsonl", _people_records(
        w.people, base, w.split, w.group if w.config.minority else None))
    write_jsonl(tmp / "unknown_people.jsonl", _people_records(w.unknown, range(len(w.unknown))))
    write_lines(tmp / "bios.jsonl", bios.jsonl(names))
    write_lines(tmp / "qa.jsonl", qa.jsonl(w.split, names))
    write_lines(tmp / "qa_paraphrase.jsonl", para.jsonl(w.split, names))
    return {"people": len(base), "p_train": len(w.train_ids), "p_test": len(w.test_ids),
            "unknown": len(w.unknown), "bios": len(bios), "qa": len(qa),
            "qa_paraphrase": len(para)}


def _update_records(w: World, t: int):
    u = w.updates.of(t)
    attrs, pools, names = w.attributes, w.people.pools, w.people.names
    for p, a, new, old in zip(u.person.tolist(), u.attribute.tolist(), u.code.tolist(),
                              u.previous.tolist()):
        yield {"person": p, "name": names[p], "attribute": attrs[a],
               "old": pools[a][old] if old >= 0 else None, "new": pools[a][new]}


def _write_experience(c: Corpus, t: int, d: Path) -> dict:
    """Files of experience ``t`` into ``d``; returns its summary for the manifest."""
    w = c.world
    names = w.people.names
    d.mkdir(parents=True, exist_ok=True)
    info = {"experience": t}
    cohort = w.ids(arrival=t)
    if len(cohort):
        bios, qa, para = c.cohort_bios(t), c.qa(cohort, at=t), c.qa(cohort, at=t, paraphrase=True)
        write_jsonl(d / "people.jsonl", _people_records(w.people, cohort, w.split,
                                                        arrival=w.arrival))
        write_lines(d / "bios.jsonl", bios.jsonl(names))
        write_lines(d / "qa.jsonl", qa.jsonl(w.split, names))
        write_lines(d / "qa_paraphrase.jsonl", para.jsonl(w.split, names))
        info.update(cohort=len(cohort), p_train=int((w.split[cohort] != TEST).sum()),
                    p_test=int((w.split[cohort] == TEST).sum()), bios=len(bios), qa=len(qa))
    n_up = len(w.updates.of(t))
    if n_up:
        moved = updated_people(w, t)
        bios, qa = c.update_bios(t), c.qa(moved, at=t)
        write_jsonl(d / "updates.jsonl", _update_records(w, t))
        write_lines(d / "update_bios.jsonl", bios.jsonl(names))
        write_lines(d / "update_qa.jsonl", qa.jsonl(w.split, names))
        info.update(updates=n_up, updated_people=len(moved), update_bios=len(bios),
                    update_qa=len(qa))
    return info


def _experience_files(root: Path, t: int) -> list[str]:
    d = root / "experiences" / str(t)
    return [f"experiences/{t}/{f}" for f in COHORT_FILES + UPDATE_FILES if (d / f).is_file()]


def _manifest(c: Corpus, counts: dict, experiences: list[dict], files: dict) -> dict:
    return {
        "factlab": __version__,
        "format": FORMAT,
        "seed": c.seed,
        "source": c.source,
        "config": c.config.model_dump(mode="json"),
        "facts_sha256": c.facts_sha256,
        "attributes": list(c.attributes),
        "counts": counts,
        "experiences": experiences,
        "files": files,
    }


def save_world(corpus: Corpus, out: str | Path, *, force: bool = False) -> dict:
    """Render and write the corpus (base world and every experience); returns the manifest."""
    with atomic_dir(out, force=force) as tmp:
        counts = _write_base(corpus, tmp)
        exps = [_write_experience(corpus, t, tmp / "experiences" / str(t))
                for t in corpus.experiences]
        files = {f: sha256_file(tmp / f) for f in FILES}
        for t in corpus.experiences:
            files.update({f: sha256_file(tmp / f) for f in _experience_files(tmp, t)})
        manifest = _manifest(corpus, counts, exps, files)
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def save_experiences(corpus: Corpus, path: str | Path) -> dict:
    """Add the experiences of ``corpus`` that the directory lacks; returns the new manifest.

    ``corpus`` must be an extension of the world stored there (same base people and pools,
    the same earlier experiences). Nothing already written changes; each new experience
    is built aside and moved into place, then the manifest is replaced atomically (an
    experience folder left by a killed call is not in the manifest and is written again).
    """
    path = Path(path)
    m = read_manifest(path)
    check_format(path, m)
    base = _people_bytes(corpus)
    if sha256_bytes(base) != m["files"].get("people.jsonl") or \
            sha256_bytes(_pools_json(corpus.world).encode()) != m["files"].get("pools.json"):
        raise FactlabError(f"{path}: holds another world (its people or pools differ from the "
                           f"corpus'); experiences can only extend the world they start from")
    have = {e["experience"]: e for e in m.get("experiences", [])}
    missing = [t for t in have if t not in corpus.experiences]
    if missing:
        raise FactlabError(f"{path}: has experience {missing[0]}, which the corpus lacks")
    files = dict(m["files"])
    exps = list(m.get("experiences", []))
    for t in corpus.experiences:
        if t in have:
            continue
        if have and t < max(have):
            raise FactlabError(f"{path}: experience {t} would come before stored experience "
                               f"{max(have)}")
        final = path / "experiences" / str(t)
        tmp = path / "experiences" / f".{t}.tmp"
        for d in (tmp, final):  # leftovers of a killed call (not in the manifest)
            if d.exists():
                shutil.rmtree(d)
        exps.append(_write_experience(corpus, t, tmp))
        tmp.rename(final)
        files.update({f: sha256_file(path / f) for f in _experience_files(path, t)})
    manifest = {**m, "factlab": __version__, "experiences": exps, "files": files}
    atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def sha256_bytes(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _people_bytes(c: Corpus) -> bytes:
    from factlab.io import dumps

    w = c.world
    recs = _people_records(w.people, w.base_ids, w.split, w.group if w.config.minority else None)
    return "".join(dumps(r) + "\n" for r in recs).encode("utf-8")


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


def check_format(path: Path, manifest: dict) -> None:
    fmt = manifest.get("format")
    if fmt == FORMAT:
        return
    if isinstance(fmt, int) and fmt < FORMAT:
        raise FactlabError(
            f"{path}: world format {fmt}, this factlab reads format {FORMAT} (which stores the "
            f"value pools so that codes survive loading). Make the world again from the config "
            f"in its manifest.json, e.g. `factlab world make NEW --config CONFIG.yaml` with that "
            f"config block, or delete it inside a run directory and rerun the recipe: the same "
            f"seed gives the same people and bios, byte for byte")
    raise FactlabError(f"{path}: world format {fmt!r} is not one this factlab ({__version__}) "
                       f"reads (format {FORMAT}); upgrade factlab")


class _Codes:
    """Value -> code for one attribute, from the stored pool. A value the pool lacks
    (a user's new value in a later experience) is appended, in the order files are read."""

    def __init__(self, pool: list[str], where: str):
        self.pool = pool
        self.index: dict[str, int] = {}
        for c, v in enumerate(pool):
            if v in self.index:
                raise FactlabError(f"{where}: value {v!r} appears twice in its pool")
            self.index[v] = c

    def __call__(self, v) -> int:
        if v is None:
            return -1
        c = self.index.get(v)
        if c is None:
            c = self.index[v] = len(self.pool)
            self.pool.append(v)
        return c


def _table(records: list[dict], attrs, codes: list[_Codes], pools) -> Table:
    return Table([r["name"] for r in records],
                 np.array([PRONOUNS.index(r["pronoun"]) if r.get("pronoun") else -1
                           for r in records], dtype=np.int8), attrs,
                 np.array([[codes[a](r.get(attr)) for a, attr in enumerate(attrs)]
                           for r in records], dtype=np.int32).reshape(len(records), len(attrs)),
                 pools)


def _docs(path: Path, attrs) -> Docs:
    recs = read_jsonl(path)
    spans = np.full((len(recs), len(attrs), 2), -1, dtype=np.int32)
    for d, r in enumerate(recs):
        for a, attr in enumerate(attrs):
            s = r["spans"].get(attr)
            if s is not None:
                spans[d, a] = s
    return Docs([r["text"] for r in recs], np.array([r["person"] for r in recs], np.int32),
                np.array([r["entry"] for r in recs], np.int32), spans, tuple(attrs))


def load_world(path: str | Path, *, verify: bool = True) -> Corpus:
    """Read a world directory back: the same codes as the world that was written, and
    its bios from disk (not re-rendered)."""
    path = Path(path)
    manifest = read_manifest(path)
    check_format(path, manifest)
    listed = manifest.get("files", {})
    for f in FILES:
        if f not in listed:
            raise FactlabError(f"{path}: the manifest does not list {f}")
    for f, digest in listed.items():
        if not (path / f).is_file():
            raise FactlabError(f"{path}: missing {f}")
        if verify and sha256_file(path / f) != digest:
            raise FactlabError(f"{path / f}: content does not match the manifest's sha256 "
                               f"(the world was modified)")
    cfg = build(CorpusConfig, manifest["config"], source=str(path / "manifest.json"))
    attrs = tuple(manifest["attributes"])
    stored = json.loads((path / "pools.json").read_text(encoding="utf-8"))
    pools = tuple(list(stored["attributes"][a]) for a in attrs)
    codes = [_Codes(pools[a], f"{path / 'pools.json'}: {attr}") for a, attr in enumerate(attrs)]
    nm = stored["names"]
    names = NamePools(tuple(nm["first"]), tuple(nm["first_gender"]), tuple(nm["middle"]),
                      tuple(nm["last"]))
    derived = tuple(Derived(attrs.index(a), attrs.index(d["from"]),
                            np.array(d["codes"], dtype=np.int32))
                    for a, d in stored["derived"].items())
    recs = read_jsonl(path / "people.jsonl")
    for r in recs:
        r["arrival"] = 0
    unknown = _table(read_jsonl(path / "unknown_people.jsonl"), attrs, codes, pools)
    ups: list[tuple] = []
    cache: dict = {}
    exps = [e["experience"] for e in manifest.get("experiences", [])]
    for t in exps:
        d = path / "experiences" / str(t)
        if (d / "people.jsonl").is_file():
            cohort = read_jsonl(d / "people.jsonl")
            if any(r["id"] != len(recs) + k for k, r in enumerate(cohort)):
                raise FactlabError(f"{d / 'people.jsonl'}: ids must follow the earlier people's")
            recs += cohort
            cache[("cohort_bios", t)] = _docs(d / "bios.jsonl", attrs)
        if (d / "updates.jsonl").is_file():
            for r in read_jsonl(d / "updates.jsonl"):
                a = attrs.index(r["attribute"])
                ups.append((r["person"], a, t, codes[a](r["new"]), codes[a](r["old"])))
            cache[("update_bios", t)] = _docs(d / "update_bios.jsonl", attrs)
    people = _table(recs, attrs, codes, pools)
    split = np.array([TEST if r["split"] == "test" else 0 for r in recs], dtype=np.int8)
    group = np.array([MINORITY if r.get("group") == "minority" else 0 for r in recs],
                     dtype=np.int8)
    arrival = np.array([r["arrival"] for r in recs], dtype=np.int16)
    updates = Updates(*(np.array([u[k] for u in ups], dtype=dt) for k, dt in enumerate(
        (np.int32, np.int16, np.int16, np.int32, np.int32)))) if ups else Updates.empty()
    world = World(cfg.world_config(), people, split, group, unknown, names,
                  source=manifest["source"], facts_sha256=manifest.get("facts_sha256"),
                  derived=derived, arrival=arrival, updates=updates)
    templates = TemplateSet.from_dict(yaml.safe_load((path / "templates.yaml").read_text("utf-8")),
                                      str(path / "templates.yaml"), attrs)
    cache["bios"] = _docs(path / "bios.jsonl", attrs)
    return Corpus(world, cfg.render_config(), templates, cache)
