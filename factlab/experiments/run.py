"""Run a recipe: every cell is world -> tokenizer -> model -> (pretrain -> finetune | mixed)
-> evaluate, in its own folder under the run directory; then the report.

    RUN/
      recipe.yaml            the resolved recipe (a rerun with another recipe is refused)
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
from factlab.experiments.recipe import CellConfig, Recipe, packing_segments
from factlab.io import atomic_write_text, write_jsonl


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
    from factlab.model.build import build_model, load_model

    if cell.model.path:
        return load_model(cell.model.path)
    return build_model(cell.model.arch, cell.model.size, len(tok), cell.model.context,
                       bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                       seed=cell.pretrain.seed)


def eval_people(world, cell: CellConfig):
    cap = cell.eval.max_people
    tr, te = world.train_ids, world.test_ids
    return (tr[:cap], te[:cap]) if cap else (tr, te)


def bio_stream(cell: CellConfig, enc_docs, tok):
    """The pretraining stream of bios: one packing, or a Schedule of packings."""
    from factlab.tokens.mixing import Schedule
    from factlab.tokens.streams import DocStream

    def stream(packing: str, i: int):
        return DocStream(enc_docs, cell.model.context, tok.eos_token_id,
                         seed=cell.pretrain.seed + i, whole=packing == "whole",
                         pad_id=tok.pad_token_id, mask_head=packing == "named")

    segments = packing_segments(cell.packing, cell.pretrain.steps)
    if len(segments) == 1:
        return stream(segments[0][0], 0)
    return Schedule([stream(p, i) for i, (p, _) in enumerate(segments)],
                    [n * cell.pretrain.batch_size for _, n in segments[:-1]])


def run_cell(cell: CellConfig, cell_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate one cell; returns (and writes) its result."""
    import torch

    from factlab.evaluate.generate import evaluate_qa
    from factlab.evaluate.curves import Curves
    from factlab.model.build import flops_per_token
    from factlab.text.qa import training_qa
    from factlab.tokens.encode import encode_docs, encode_qa
    from factlab.tokens.mixing import Mixture
    from factlab.tokens.streams import QAStream
    from factlab.train import LoRA, Loop

    from accelerate import PartialState

    t0 = time.perf_counter()
    state = PartialState()  # under `accelerate launch`: rank 0 writes, the others read
    cell_dir.mkdir(parents=True, exist_ok=True)
    if cell.model.threads:
        torch.set_num_threads(cell.model.threads)
    with state.main_process_first():
        world = prepare_world(cell, cell_dir)
        tok = prepare_tokenizer(cell, cell_dir, world)
    model = prepare_model(cell, tok)
    L = cell.model.context
    enc_docs = encode_docs(tok, world.bios())
    enc_train_qa = encode_qa(tok, training_qa(world))
    docs = bio_stream(cell, enc_docs, tok)
    qa = QAStream(enc_train_qa, L, tok.pad_token_id, seed=cell.finetune.seed,
                  pack=cell.finetune.pack_qa or cell.regime == "mixed")
    curves = Curves(world, tok, enc_docs, L, cell.eval.first_token_people,
                    batch_size=cell.eval.batch_size)
    fpt = flops_per_token(model, L)
    stages = {}
    tag = f"[{cell.name}]"

    if cell.regime == "mixed":
        stream = Mixture([qa, docs], [cell.qa_ratio, 1 - cell.qa_ratio], seed=cell.pretrain.seed)
        _log(f"{tag} mixed training: {cell.pretrain.steps} steps, QA_r={cell.qa_ratio}")
        loop = Loop(model, stream, cell.pretrain, cell_dir / "mixed", evaluate=curves,
                    tokenizer=tok, progress=progress, flops_per_token=fpt, name=f"{cell.name} mixed")
        stages["mixed"] = loop.run()
        model = loop.model
    else:
        _log(f"{tag} BIO pretraining: {cell.pretrain.steps} steps on {len(world.bios())} bios")
        loop = Loop(model, docs, cell.pretrain, cell_dir / "pretrain", evaluate=curves,
                    tokenizer=tok, progress=progress, flops_per_token=fpt,
                    name=f"{cell.name} pretrain")
        stages["pretrain"] = loop.run()
        model = loop.model
        ft = cell.finetune
        plugins = [LoRA(r=ft.lora_r, r_embed=ft.lora_r_embed)] if ft.mode == "lora" else []
        _log(f"{tag} QA finetuning ({ft.mode}): {ft.steps} steps on {len(enc_train_qa.offsets) - 1} "
             f"P_train questions")
        loop = Loop(model, qa, ft, cell_dir / "finetune", plugins=plugins, evaluate=curves,
                    tokenizer=tok, progress=progress, flops_per_token=fpt,
                    name=f"{cell.name} finetune")
        stages["finetune"] = loop.run()
        model = loop.model

    probes = None
    if cell.probe is not None:  # every rank trains (DDP), the main one writes
        from factlab.probe.run import probe_cell

        _log(f"{tag} probing ({', '.join(cell.probe.kinds)}) the pretrained model")
        probes = probe_cell(cell, cell_dir, world, tok, progress=progress)

    if not state.is_main_process:
        return {}
    # final QA extraction: in-distribution (P_train) and out-of-distribution (P_test)
    id_people, ood_people = eval_people(world, cell)
    result = {"cell": cell.name, "regime": cell.regime, "augment": cell.world.augment,
              "people": len(world.people), "params": int(sum(p.numel() for p in model.parameters()))}
    for split, ids in (("id", id_people), ("ood", ood_people)):
        metrics, preds = evaluate_qa(model, tok, world.qa(ids), batch_size=cell.eval.batch_size,
                                     num_beams=cell.eval.num_beams)
        write_jsonl(cell_dir / f"predictions_{split}.jsonl", preds)
        result[split] = metrics
    para, preds = evaluate_qa(model, tok, world.qa(id_people, paraphrase=True),
                              batch_size=cell.eval.batch_size, num_beams=cell.eval.num_beams)
    write_jsonl(cell_dir / "predictions_id_paraphrase.jsonl", preds)
    result["id_paraphrase"] = para
    if probes is not None:
        result["probe"] = probes
    result["curves"] = {k: [r for r in v if any(x.startswith("eval/") for x in r)]
                        for k, v in stages.items()}
    result["loss"] = {k: [[r["step"], r["loss"]] for r in v] for k, v in stages.items()}
    result["tokens_per_s"] = {k: float(np.mean([r["tokens_per_s"] for r in v
                                                if "tokens_per_s" in r] or [0]))
                              for k, v in stages.items()}
    result["seconds"] = time.perf_counter() - t0
    atomic_write_text(cell_dir / "result.json", json.dumps(result, indent=1) + "\n")
    _log(f"{tag} OOD exact match {result['ood']['exact_match']:.1%}, "
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
    rfile = out / "recipe.yaml"
    if rfile.is_file() and rfile.read_text() != resolved and not force:
        raise FactlabError(f"{out} holds a run of a different recipe/config; use another "
                           f"--out, or --force to replace it")
    if force and out.exists() and rfile.is_file() and rfile.read_text() != resolved:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        atomic_write_text(rfile, resolved)
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


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-_.=" else "_" for ch in name)
