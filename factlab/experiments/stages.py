"""A cell is an ordered list of typed stages; each is one short function over the cell's
shared state (torchtune-recipe style: read top to bottom, no inheritance).

    pretrain   BIO pretraining on the world's bios            -> CELL/pretrain/
    finetune   QA finetuning on P_train (full or LoRA)        -> CELL/finetune/
    mixed      bios and QA mixed from the start               -> CELL/mixed/
    probe      P-/Q-probes of the pretrained model            -> CELL/probe_{p,q}*
    extract    exact-match QA extraction: ID, OOD, paraphrase -> CELL/predictions_*.jsonl
    capacity   bits of knowledge stored (Part 3.3)            -> CELL/result.json
    memory     new facts in a memory bank on the trained model -> CELL/memory/

``CellConfig.stages`` names them in order (default from ``regime``: pretrain, finetune
-- or mixed --, then probe when configured, then extract, then memory when configured).
Each stage registers the report section that shows its numbers (``Stage.section``); a
later stage kind (streams, comparisons) is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class CellRun:
    """What the stages of one cell share; a stage reads and replaces ``model``."""

    cell: object
    dir: Path
    world: object
    tok: object
    model: object
    progress: bool
    is_main: bool
    enc_docs: object = None
    curves: object = None
    flops_per_token: float | None = None
    history: dict = field(default_factory=dict)  # stage -> the loop's metric rows
    result: dict = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"[{self.cell.name}]"


@dataclass
class Stage:
    run: Callable[[CellRun], None]
    section: Callable | None = None  # (out, recipe, results, cells) -> report lines
    doc: str = ""


STAGES: dict[str, Stage] = {}


def stage(name: str, section: Callable | None = None):
    def register(fn):
        STAGES[name] = Stage(fn, section, (fn.__doc__ or "").strip())
        return fn
    return register


def eval_people(world, cell):
    cap = cell.eval.max_people
    tr, te = world.train_ids, world.test_ids
    return (tr[:cap], te[:cap]) if cap else (tr, te)


def doc_stream(cell, enc_docs, tok, packing: str, i: int = 0):
    """The bios packed one way (``whole``, ``named`` or ``concat``): segment ``i`` of the
    cell's packing schedule."""
    from factlab.tokens.streams import DocStream

    return DocStream(enc_docs, cell.model.context, tok.eos_token_id,
                     seed=cell.pretrain.seed + i, whole=packing == "whole",
                     pad_id=tok.pad_token_id, mask_head=packing == "named")


def bio_stream(cell, enc_docs, tok, share: float = 1.0):
    """The pretraining stream of bios: one packing, or a Schedule of packings. ``share``:
    the expected fraction of the steps' rows that are bios (mixed training), so that a
    schedule switches packing at its fraction of the steps."""
    from factlab.experiments.recipe import packing_segments
    from factlab.tokens.mixing import Schedule

    segments = packing_segments(cell.packing, cell.pretrain.steps)
    if len(segments) == 1:
        return doc_stream(cell, enc_docs, tok, segments[0][0])
    return Schedule([doc_stream(cell, enc_docs, tok, p, i) for i, (p, _) in enumerate(segments)],
                    [max(1, round(n * cell.pretrain.batch_size * share))
                     for _, n in segments[:-1]])


def bio_views(cell, enc_docs, tok) -> tuple[float, float]:
    """(bios read in BIO pretraining, bios per row of its last packing): rows x the
    bios a row of each packing holds (an epoch's bios over its rows, epoch 0's layout;
    epochs differ by a few rows in ten thousand). Whole packing puts as many whole bios in
    a row as fit: at context 192, 1.7 bios of ~92 tokens, not one (until 2026-12-07,
    seventh session, the capacity stage counted one, and reported 60% of the exposures)."""
    from factlab.experiments.recipe import packing_segments

    views, per_row = 0.0, 0.0
    for i, (packing, steps) in enumerate(packing_segments(cell.packing, cell.pretrain.steps)):
        s = doc_stream(cell, enc_docs, tok, packing, i)
        per_row = len(enc_docs.lengths) / s.sequences_per_epoch
        views += steps * cell.pretrain.batch_size * per_row
    return views, per_row


def recount_exposures(cell, cell_dir: Path) -> tuple[float, float] | None:
    """(exposures, bios per row) of a capacity cell's pretraining, counted with
    :func:`bio_views` from the run's own world and tokenizer: for results from before the
    stage counted the bios a row holds. None when the cell's world or tokenizer is gone."""
    from factlab.corpus import load_world
    from factlab.tokens.encode import encode_docs
    from factlab.tokens.tokenizer import load_tokenizer

    wdir, tdir = Path(cell_dir) / "world", Path(cell_dir) / "tokenizer"
    if not (wdir / "manifest.json").is_file() or not (tdir / "tokenizer.json").is_file():
        return None
    world, tok = load_world(wdir), load_tokenizer(tdir)
    views, per_row = bio_views(cell, encode_docs(tok, world.bios()), tok)
    return views / len(world.people), per_row


def _log(msg: str) -> None:
    print(msg, flush=True)


def _loop(run: CellRun, stream, cfg, name: str, plugins=()):
    from factlab.train import Loop

    loop = Loop(run.model, stream, cfg, run.dir / name, plugins=plugins, evaluate=run.curves,
                tokenizer=run.tok, progress=run.progress, flops_per_token=run.flops_per_token,
                name=f"{run.cell.name} {name}")
    run.history[name] = loop.run()
    run.model = loop.model


def _qa_stream(run: CellRun, pack: bool):
    from factlab.text.qa import training_qa
    from factlab.tokens.encode import encode_qa
    from factlab.tokens.streams import QAStream

    enc = encode_qa(run.tok, training_qa(run.world, kinds=run.cell.questions),
                    run.cell.model.prompt_format)
    return QAStream(enc, run.cell.model.context, run.tok.pad_token_id,
                    seed=run.cell.finetune.seed, pack=pack)


def _bio_stream(run: CellRun, share: float = 1.0):
    return bio_stream(run.cell, run.enc_docs, run.tok, share)


@stage("pretrain")
def pretrain(run: CellRun) -> None:
    """BIO pretraining: the bios packed as ``packing`` says."""
    _log(f"{run.tag} BIO pretraining: {run.cell.pretrain.steps} steps on "
         f"{len(run.world.bios())} bios")
    _loop(run, _bio_stream(run), run.cell.pretrain, "pretrain")


@stage("finetune")
def finetune(run: CellRun) -> None:
    """QA finetuning on P_train, full or LoRA, one question per sequence by default."""
    from factlab.train import LoRA

    ft = run.cell.finetune
    qa = _qa_stream(run, pack=ft.pack_qa)
    plugins = [LoRA(r=ft.lora_r, r_embed=ft.lora_r_embed)] if ft.mode == "lora" else []
    _log(f"{run.tag} QA finetuning ({ft.mode}): {ft.steps} steps on {len(qa.enc)} "
         f"P_train questions")
    _loop(run, qa, ft, "finetune", plugins)


@stage("mixed")
def mixed(run: CellRun) -> None:
    """Mixed training from scratch: each sequence (``mix: sequence``, QA packed) or each
    batch (``mix: batch``, one question per row) all-QA with probability ``qa_ratio``,
    else bios."""
    from factlab.tokens.mixing import Mixture

    c = run.cell
    by_batch = c.mix == "batch"
    stream = Mixture([_qa_stream(run, pack=not by_batch), _bio_stream(run, 1 - c.qa_ratio)],
                     [c.qa_ratio, 1 - c.qa_ratio], seed=c.pretrain.seed,
                     run=c.pretrain.batch_size if by_batch else 1)
    _log(f"{run.tag} mixed training: {c.pretrain.steps} steps, QA_r={c.qa_ratio} "
         f"(per {c.mix})")
    _loop(run, stream, c.pretrain, "mixed")


def _probe_section(out, recipe, results, cells):
    from factlab.experiments.probe_report import probe_section

    return probe_section(out, results, cells)


@stage("probe", section=_probe_section)
def probe(run: CellRun) -> None:
    """P-/Q-probing of the pretrained model (every rank trains; the main one writes)."""
    from factlab.probe.run import probe_cell

    _log(f"{run.tag} probing ({', '.join(run.cell.probe.kinds)}) the pretrained model")
    run.result["probe"] = probe_cell(run.cell, run.dir, run.world, run.tok,
                                     progress=run.progress)


def _capacity_section(out, recipe, results, cells):
    from factlab.experiments.capacity_report import capacity_section

    return capacity_section(out, results, cells)


def capacity_series(cell, over: str = "exposures") -> str:
    """What makes two capacity cells points of one series: everything that shapes the
    pretraining but its length (world, tokenizer, model, packing, and the optimiser's
    settings but steps and logging), as a short hash. Cells of one series differ only in
    steps; a run at another learning rate is another model, not another exposure count
    (capacity_report.saturation). ``over="people"``: the series over world sizes, which
    leaves out the number of people too (its cells differ in people and in the steps that
    keep their exposures). Seeds (the world's draw, the run's) are left out too: a run at
    another seed is another measurement of the same point, pooled with it (its mean)."""
    import hashlib
    import json

    from factlab.train.config import CADENCE_FIELDS

    train = cell.pretrain.model_dump(mode="json",
                                     exclude={"steps", "seed", *CADENCE_FIELDS})
    world = cell.world.model_dump(
        mode="json", exclude={"seed", "people"} if over == "people" else {"seed"})
    key = {"world": world,
           "tokenizer": cell.tokenizer.model_dump(mode="json"),
           "model": cell.model.model_dump(mode="json", exclude={"threads"}),
           "packing": cell.packing, "pretrain": train}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@stage("capacity", section=_capacity_section)
def capacity(run: CellRun) -> None:
    """Part 3.3's bits of knowledge stored by the pretrained model: from its loss on every
    person's values in their first bio that does not give them away, against the values'
    entropy under the world's uniform draws (``factlab.evaluate.capacity``)."""
    from factlab.evaluate.capacity import (bits_per_parameter, bits_stored, person_value_nll,
                                           pool_sizes)

    if not run.is_main:
        return
    c, w = run.cell, run.world
    # each value in the person's first bio that does not give it away (no company city
    # before the employer): factlab.evaluate.capacity.clean_docs
    sizes = pool_sizes(w.world)
    nll = person_value_nll(run.model, run.tok, w.bios(), sizes, getattr(w.world, "derived", ()),
                           batch_size=c.eval.batch_size)
    got = bits_stored(nll, sizes)
    params = int(sum(p.numel() for p in run.model.parameters()))
    emb = run.model.get_input_embeddings().weight.numel()
    # exposures: bios read per person (each of a person's bios is one exposure)
    rows = c.pretrain.steps * c.pretrain.batch_size
    n_people = len(w.people)
    read, per_row = bio_views(c, run.enc_docs, run.tok)
    views = read / n_people
    got.update(params=params, non_embedding_params=params - emb, exposures=views,
               rows=rows, bios_per_row=per_row, people=n_people,
               batch_size=c.pretrain.batch_size, lr=c.pretrain.lr, clean_context=True,
               bits_per_param=bits_per_parameter(got["bits"], params),
               series=capacity_series(c),
               people_series=capacity_series(c, over="people"))
    run.result["capacity"] = got
    _log(f"{run.tag} capacity: {got['bits']:,.0f} of {got['entropy_bits']:,.0f} bits "
         f"({got['bits_per_param']:.3f} bits/parameter, {views:.0f} exposures)")


def _extraction_section(out, recipe, results, cells):
    from factlab.experiments.report import extraction_section

    return extraction_section(out, recipe, results, cells)


@stage("extract", section=_extraction_section)
def extract(run: CellRun) -> None:
    """Exact-match QA extraction on P_train (ID), P_test (OOD) and held-out phrasings; and
    inverse search (ID and OOD) when the cell trains on inverse questions."""
    from factlab.evaluate.generate import evaluate_qa
    from factlab.io import write_jsonl

    if not run.is_main:
        return
    c, w = run.cell, run.world
    id_people, ood_people = eval_people(w, c)
    sets = [("id", w.qa(id_people)), ("ood", w.qa(ood_people)),
            ("id_paraphrase", w.qa(id_people, paraphrase=True))]
    if "inverse" in c.questions:
        sets += [("id_inverse", w.inverse_qa(id_people)),
                 ("ood_inverse", w.inverse_qa(ood_people))]
    for split, qa in sets:
        metrics, preds = evaluate_qa(run.model, run.tok, qa, batch_size=c.eval.batch_size,
                                     num_beams=c.eval.num_beams,
                                     prompt_format=c.model.prompt_format)
        write_jsonl(run.dir / f"predictions_{split}.jsonl", preds)
        run.result[split] = metrics


def _memory_section(out, recipe, results, cells):
    from factlab.memory.run import _pct, _tf

    rows = [r for r in results if "memory" in r]
    if not rows:
        return []
    lines = ["## Memory tuning", "",
             "New facts about names new to each cell's world, stored in a memory bank on the "
             "cell's trained model (frozen) and recalled by greedy generation after tuning "
             "(teacher-forced beside); locality: the model's answers recorded before the "
             "write, on its own questions (held-out people's among them), the stored "
             "relation asked about never-stored names, and the world's other questions "
             "about the stored names. Each cell's full report: `CELL/memory/report.md`.", "",
             "| cell | facts | recall | recall, bank zeroed | exposures / fact (max) | tuning "
             "| held-out before → after | answers unchanged: own / never-stored / stored "
             "names | AUROC stored vs never stored |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        u = m["unchanged"]
        lines.append(
            f"| {r['cell']} | {m['facts']:,} ({m['answers']}) | {_pct(m['recall'])}"
            f"{_tf(m['recall_tf'])} | {_pct(m['bank_zeroed'])} | {m['exposures_mean']:.1f} "
            f"({m['exposures_max']}) | {m['tuning_s']:.0f} s | {_pct(m['held_out_before'])} → "
            f"{_pct(m['held_out_after'])} | "
            + " / ".join(_pct(u.get(k)) for k in ("own", "never_stored", "stored_entities"))
            + f" | {m['auroc']:.3f} |")
    return lines + [""]


@stage("memory", section=_memory_section)
def memory(run: CellRun) -> None:
    """Memory tuning (``factlab.memory``) on the cell's trained model, frozen:
    ``memory.facts`` new facts about names new to the world, each answered with 32 random
    characters or a value of the world's ``memory.values`` attribute, measured as
    ``factlab memory tune`` does (reliability, locality, unknown names, abstention)."""
    import json

    from factlab.errors import FactlabError
    from factlab.experiments.run import cell_model
    from factlab.memory.facts import generated_facts
    from factlab.memory.run import held_out, tune_memory

    if not run.is_main:
        return
    c = run.cell.memory
    if c is None:
        raise FactlabError(f"{run.tag} the memory stage needs the cell's memory: settings")
    model_dir, _, tok_dir = cell_model(run.dir)  # the last trained stage's model
    cfg = c.settings()
    facts, names = generated_facts(run.world, c.facts, c.values, cfg.seed)
    out = run.dir / "memory"
    run_id = {"memory": c.model_dump(), "model": str(model_dir.relative_to(run.dir))}
    marker = out / "memory_run.json"
    same = marker.is_file() and json.loads(marker.read_text()) == run_id
    _log(f"{run.tag} memory tuning: {c.facts:,} new facts on the {model_dir.parent.name} "
         f"model")
    if same and (out / "results.json").is_file():  # finished: read, not redone
        res = json.loads((out / "results.json").read_text())
    else:
        res = tune_memory(model_dir, tok_dir, facts, names, out, cfg, corpus=run.world,
                          progress=run.progress, run_id=run_id, replace=not same)
    ho, rel = held_out(res["locality"]), res["reliability"]
    run.result["memory"] = {
        "facts": res["facts"], "answers": c.values or "random 32 characters",
        "recall": rel["generation_exact_match"], "recall_tf": rel["teacher_forced_all_argmax"],
        "bank_zeroed": rel["bank_zeroed"], "exposures_mean": res["tuning"]["exposures_mean"],
        "exposures_max": res["tuning"]["exposures_max"], "tuning_s": res["timing_s"]["tuning"],
        "held_out_before": ho.get("before"), "held_out_after": ho.get("after"),
        "unchanged": {k: v["unchanged"] for k, v in res["locality"].items()},
        "auroc": res["abstention"]["auroc_stored_vs_never_stored"]}
    _log(f"{run.tag} memory: {rel['generation_exact_match']:.1%} of {res['facts']:,} facts "
         f"recalled, held-out {ho.get('before', float('nan')):.1%} -> "
         f"{ho.get('after', float('nan')):.1%}")
