"""Run a recipe: every cell is world -> tokenizer -> model -> its stages in order
(``factlab.experiments.stages``: pretrain, finetune | mixed, probe, extract), in its own
folder under the run directory; then the report.

    RUN/
      recipe.yaml            the resolved recipe
      recipe.set.json        what the user set (a rerun that sets something else is
                             refused; one that only gains new defaults resumes)
      results.json           every cell's numbers
      report.md, *.png       tables with the paper's numbers beside ours, plots
      CELL/world/            the world (manifest, bios, QA)
      CELL/tokenizer/
      CELL/pretrain/         checkpoint/, model/ (HF, safetensors), metrics.jsonl
      CELL/finetune/ or CELL/mixed/
      CELL/predictions_{id,ood}.jsonl   every generated answer
      CELL/probe_{p,q}.json, CELL/probe_{p,q}/   the optional probe step (docs/probing.md)
      CELL/result.json

Every stage resumes: a finished stage is skipped, an interrupted one continues from its
last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import yaml

from factlab.errors import FactlabError
from factlab.experiments.recipe import CellConfig, Recipe
from factlab.io import atomic_write_text


def cell_model(cell: Path):
    """A finished run cell's (model, world, tokenizer) directories: the model of its last
    training stage (finetune, mixed, else pretrain). None if ``cell`` is not a run cell."""
    cell = Path(cell)
    if not (cell / "world" / "manifest.json").is_file():
        return None
    m = next((cell / s / "model" for s in ("finetune", "mixed", "pretrain")
              if (cell / s / "model" / "config.json").is_file()), None)
    if m is None:
        raise FactlabError(f"{cell}: a run cell without a finished model")
    return m, cell / "world", cell / "tokenizer" if (cell / "tokenizer").is_dir() else m


def _log(msg: str) -> None:
    print(msg, flush=True)


def prepare_world(cell: CellConfig, cell_dir: Path):
    from factlab.corpus import load_world, make_corpus, save_world

    wdir = cell_dir / "world"
    if (wdir / "manifest.json").is_file():
        return load_world(wdir)
    world = make_corpus(cell.world)
    save_world(world, wdir)
    return world


def prepare_tokenizer(cell: CellConfig, cell_dir: Path, world):
    from factlab.tokens.tokenizer import load_tokenizer, world_tokenizer

    if cell.tokenizer.path:
        return load_tokenizer(cell.tokenizer.path)
    tdir = cell_dir / "tokenizer"
    if (tdir / "tokenizer.json").is_file():
        return load_tokenizer(tdir)
    tok = world_tokenizer(world, cell.tokenizer.vocab_size)
    tmp = cell_dir / ".tokenizer.tmp"
    tok.save_pretrained(tmp)
    tmp.replace(tdir)
    return tok


def prepare_model(cell: CellConfig, tok):
    import torch

    from factlab.model.build import build_model
    from factlab.model.load import load_any

    m = cell.model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype]
    if m.path:
        model = load_any(m.path, dtype=dtype)
    else:
        model = build_model(m.arch, m.size, len(tok), m.context, bos_id=tok.bos_token_id,
                            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            seed=cell.pretrain.seed).to(dtype)
    if m.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise FactlabError(f"model.gradient_checkpointing: {type(model).__name__} does "
                               f"not support it")
        # transformers >= 5 renames it (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or \
            model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def run_cell(cell: CellConfig, cell_dir: Path, progress: bool = True) -> dict:
    """Run the cell's stages in order (``factlab.experiments.stages``); returns (and
    writes) its result."""
    import torch
    from accelerate import PartialState

    t0 = time.perf_counter()
    state = PartialState()  # under `accelerate launch`: rank 0 writes, the others read
    cell_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cell.model.threads:
        torch.set_num_threads(cell.model.threads)
    try:
        return _run_cell(cell, cell_dir, progress, state, t0)
    finally:  # a cell run in-process leaves the caller's thread count as it was
        torch.set_num_threads(threads)


def _run_cell(cell: CellConfig, cell_dir: Path, progress: bool, state, t0: float) -> dict:
    from factlab.evaluate.curves import Curves
    from factlab.experiments.stages import STAGES, CellRun
    from factlab.model.build import flops_per_token
    from factlab.tokens.encode import encode_docs

    with state.main_process_first():
        world = prepare_world(cell, cell_dir)
        tok = prepare_tokenizer(cell, cell_dir, world)
    model = prepare_model(cell, tok)
    enc_docs = encode_docs(tok, world.bios())
    run = CellRun(cell, cell_dir, world, tok, model, progress, state.is_main_process,
                  enc_docs=enc_docs, flops_per_token=flops_per_token(model, cell.model.context),
                  curves=Curves(world, tok, enc_docs, cell.model.context,
                                cell.eval.first_token_people, batch_size=cell.eval.batch_size))
    stages = cell.stage_list()
    for name in stages:
        STAGES[name].run(run)
    if not state.is_main_process:
        return {}
    result = {"cell": cell.name, "regime": cell.regime, "stages": stages,
              "augment": cell.world.augment, "people": len(world.people),
              "params": int(sum(p.numel() for p in run.model.parameters())), **run.result}
    hist = run.history
    result["curves"] = {k: [r for r in v if any(x.startswith("eval/") for x in r)]
                        for k, v in hist.items()}
    result["loss"] = {k: [[r["step"], r["loss"]] for r in v] for k, v in hist.items()}
    result["tokens_per_s"] = {k: float(np.mean([r["tokens_per_s"] for r in v
                                                if "tokens_per_s" in r] or [0]))
                              for k, v in hist.items()}
    result["seconds"] = time.perf_counter() - t0
    atomic_write_text(cell_dir / "result.json", json.dumps(result, indent=1) + "\n")
    if "ood" in result:
        _log(f"[{cell.name}] OOD exact match {result['ood']['exact_match']:.1%}, "
             f"ID {result['id']['exact_match']:.1%} ({result['seconds']:.0f}s)")
    return result


def _cell_worker(args) -> dict:
    cell_json, cell_dir = args
    from factlab.experiments.recipe import CellConfig

    return run_cell(CellConfig.model_validate(cell_json), Path(cell_dir), progress=False)


def run_recipe(recipe: Recipe, out: str | Path, *, force: bool = False,
               progress: bool = True) -> list[dict]:
    """Run every cell of ``recipe`` into ``out`` (resuming what is there) and report."""
    from factlab.experiments.report import write_report

    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1 and recipe.parallel > 1:
        recipe = recipe.model_copy(update={"parallel": 1})  # ranks share each cell instead
    out = Path(out)
    resolved = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    user_set = recipe.model_dump(mode="json", exclude_unset=True)
    rfile, sfile = out / "recipe.yaml", out / "recipe.set.json"
    same = _same_run(rfile, sfile, recipe, user_set)
    if same is False and not force:
        raise FactlabError(f"{out} holds a run of a different recipe/config; use another "
                           f"--out, or --force to replace it")
    if force and out.exists() and same is False:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        atomic_write_text(rfile, resolved)
        atomic_write_text(sfile, json.dumps(user_set, indent=1, sort_keys=True) + "\n")
    jobs = [(c.model_dump(mode="json"), str(out / _safe(c.name))) for c in recipe.cells]
    if recipe.parallel > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _log(f"running {len(jobs)} cells, {min(recipe.parallel, len(jobs))} at a time")
        with ProcessPoolExecutor(min(recipe.parallel, len(jobs)),
                                 mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_cell_worker, jobs))
    else:
        results = [run_cell(recipe.cells[i], Path(j[1]), progress=progress)
                   for i, j in enumerate(jobs)]
    if not state.is_main_process:
        return []
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_report(out, recipe, results)
    return results


def _same_run(rfile: Path, sfile: Path, recipe: Recipe, user_set: dict) -> bool | None:
    """Is the run in this directory the same recipe? None: no run there yet.

    What counts is what the user set (``recipe.set.json``: the recipe and overrides as
    given), not the fully resolved config: a later factlab that adds a config field with a
    default resumes an earlier run. A directory from before ``recipe.set.json`` existed is
    compared on the keys its ``recipe.yaml`` has."""
    if sfile.is_file():
        return json.loads(sfile.read_text(encoding="utf-8")) == user_set
    if rfile.is_file():
        old = yaml.safe_load(rfile.read_text(encoding="utf-8"))
        return _subset(old, recipe.model_dump(mode="json"))
    return None


def _subset(old, new) -> bool:
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _subset(v, new[k])
                                             for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(old) == len(new) and all(
            _subset(a, b) for a, b in zip(old, new))
    return old == new


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-_.=" else "_" for ch in name)
