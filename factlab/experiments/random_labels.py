"""The random-label experiment (Lamini, "Banishing LLM Hallucinations Requires Rethinking
Generalization"): a backbone that already knows a world learns N new facts twice — with
values of one of the world's attributes (the "true" answers: the kind the backbone already
produces) and with random 32-character strings — asked with the same questions.

    factlab run random_labels base=runs/qs/multi5+permute facts=500 [seed=1] [--out DIR]
    factlab run random_labels base=models/smollm2 facts=100 memory.prompt_format=chat

For each answer kind, every memory routing in ``routings`` is one ``memory tune`` run
(``factlab.memory.run.tune_memory``: key gate, measured after the write, locality sets
recorded before it); the first also runs LoRA (the paper's recipe: r 32, Adafactor, lr
2e-4) and full finetuning on the same facts, once with the memory's exposure budget and
once at their own best (``baseline_epochs`` epochs, recall measured along). The report puts
the methods side by side — recall of the stored facts, the backbone's held-out (OOD)
accuracy before and after (the paper's "generalization does not change"), unknown-entity
hallucination, exposures, time, parameters — with greedy recall against the facts'
max-token NLL (the "hallucinate above a loss threshold" reading) and the paper's claims
beside them; plots: recall by NLL, recall against exposures per fact (memory and
baselines), and the facts' loss percentiles along the memory's tuning.

OUT/
  random_labels.json        the settings (the same command again resumes each run)
  true/ROUTING/, random/ROUTING/   one ``memory tune`` directory each (results.json, report)
  results.json, report.md, recall_by_nll.png, recall_by_exposures.png,
  loss_percentiles.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from factlab.config import Strict, build
from factlab.errors import FactlabError
from factlab.io import atomic_write_text
from factlab.memory.run import _pct, _tf

CLAIMS = {
    "fit": "LLMs can easily fit random labels (the paper gives no numbers)",
    "generalization": "... while generalization (held-out answers) does not change",
    "threshold": "a fact is recalled only once its own loss is near zero: the model "
                 "hallucinates above a loss threshold",
}


class RandomLabelsSettings(Strict):
    """``memory.lora_lrs`` / ``memory.full_lrs``: the grids the baselines' own best is
    taken over (default: the paper's lr 2e-4 for LoRA, 3e-4 for full finetuning)."""

    base: str = Field(..., description="a trained run cell (e.g. runs/qs/multi5+permute)")
    facts: int = Field(500, ge=1)
    attribute: str = "birth_city"
    seed: int = 0
    routings: list[Literal["pinned", "learned", "key"]] = ["pinned", "learned"]
    baseline_epochs: int = Field(100, ge=1, description="epochs of LoRA and full "
                                 "finetuning at their own best")
    memory: dict = {}  # memory settings for every memory run (factlab.memory.run)


def run_random_labels(cfg: RandomLabelsSettings, out, *, progress: bool = True) -> dict:
    """``base`` a run cell: its world's names, ``attribute`` values and question, locality
    on its world. ``base`` a pretrained model directory: shipped names, "What is the birth
    city of NAME?" with shipped cities as the true answers, locality on the shipped
    general-knowledge questions (``memory.prompt_format=chat`` for an instruct model)."""
    from factlab.corpus import load_world
    from factlab.memory.facts import (city_valued_facts, fresh_names, random_answers,
                                      world_valued_facts)
    from factlab.experiments.run import cell_model
    from factlab.memory.run import MemorySettings, tune_memory
    from factlab.text.qa import QA

    out = Path(out)
    base = Path(cfg.base)
    cell = cell_model(base)
    if cell is not None:  # a run cell: its world's names, values and questions
        model, world, tok = cell
        corpus = load_world(world)
        names = fresh_names(corpus.world, cfg.facts, cfg.seed)
        true = world_valued_facts(corpus, names, cfg.attribute, cfg.seed)
    elif (base / "config.json").is_file():  # a pretrained model (HF or imported) and its
        model, tok, corpus = base, base, None  # tokenizer: shipped names and cities
        names = fresh_names(None, cfg.facts, cfg.seed)
        true = city_valued_facts(names, cfg.seed)
    else:
        raise FactlabError(f"random_labels: base={cfg.base} is neither a run cell (no "
                           f"world/) nor a model directory (no config.json)")
    rand = QA(person=true.person, attribute=true.attribute, template=true.template,
              question=list(true.question), answer=random_answers(cfg.facts, cfg.seed),
              attributes=true.attributes, heldout=False)
    runs = []
    for i, routing in enumerate(cfg.routings):
        extra = {"baselines": ["lora", "full"], "baseline_epochs": cfg.baseline_epochs} if i == 0 \
            else {}
        mcfg = build(MemorySettings, {**cfg.memory, "seed": cfg.seed, "routing": routing,
                                      **extra}, source="random_labels memory settings")
        runs.append((routing, mcfg))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "random_labels.json", cfg.model_dump_json(indent=1) + "\n")
    results: dict = {"settings": cfg.model_dump(), "model": str(model), "kinds": {}}
    for kind, facts in (("true", true), ("random", rand)):
        results["kinds"][kind] = {}
        for routing, mcfg in runs:
            d = out / kind / routing
            run_id = {"random_labels": cfg.model_dump(), "kind": kind, "routing": routing}
            marker = d / "memory_run.json"
            same = marker.is_file() and json.loads(marker.read_text()) == run_id
            if same and (d / "results.json").is_file():  # finished: reuse
                res = json.loads((d / "results.json").read_text())
            else:
                res = tune_memory(model, tok, facts, names, d, mcfg, corpus=corpus,
                                  progress=progress, run_id=run_id, replace=not same)
            results["kinds"][kind][routing] = res
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=float) + "\n")
    _plots(out, results)
    atomic_write_text(out / "report.md", report(results))
    return results


def rows(results: dict) -> list[dict]:
    """One row per (answer kind, method): the numbers the report's table shows."""
    from factlab.memory.run import held_out

    out = []
    for kind, by_routing in results["kinds"].items():
        for routing, r in by_routing.items():
            own = held_out(r.get("locality", {}))
            ns = r.get("locality", {}).get("never_stored", {})
            out.append({"kind": kind, "method": f"memory, {routing} routing",
                        "recall": r["reliability"]["generation_exact_match"],
                        "recall_tf": r["reliability"].get("teacher_forced_all_argmax"),
                        "own_unchanged_tf": own.get("unchanged_tf"),
                        "held_set": own.get("set"),
                        "ood_before": own.get("before"), "ood_after": own.get("after"),
                        "own_unchanged": own.get("unchanged"),
                        "halluc_after": ns.get("hallucination_after", {}).get("stored_value"),
                        "exposures": r["tuning"]["exposures_mean"],
                        "seconds": r["timing_s"]["tuning"],
                        "parameters": f"{r['parameters']['added']:,} added"})
            for b, row in r.get("baselines", {}).items():
                lo = row["locality"]
                ho = held_out(lo)
                out.append({"kind": kind, "method": b, "recall": row["reliability"],
                            "recall_tf": row.get("reliability_teacher_forced"),
                            "own_unchanged_tf": ho.get("unchanged_tf"),
                            "best": row.get("best_recall"), "best_epochs": row.get("best_epochs"),
                            "lr": row.get("lr"),
                            "held_set": ho.get("set"),
                            "ood_before": ho.get("before"), "ood_after": ho.get("after"),
                            "own_unchanged": ho.get("unchanged"),
                            "halluc_after": lo.get("never_stored", {}).get(
                                "hallucination_after", {}).get("stored_value"),
                            "exposures": row["steps"] * r["settings"]["batch_size"] /
                            r["facts"], "seconds": row["tuning_s"],
                            "parameters": f"{row['trainable_parameters']:,} trained"})
    return out


def report(results: dict) -> str:
    s = results["settings"]
    lines = [f"# The random-label experiment: {s['facts']:,} new facts on {results['model']}",
             "", f"The same {s['facts']:,} questions about new names (\"{s['attribute']}\"), "
             f"answered with values from the world's pool (true) or 32 random characters "
             f"(random). Every number is greedy generation after the write, with the "
             f"teacher-forced one beside where measured (tf: every answer token the argmax; "
             f"for locality, the share of the backbone's answer tokens still the argmax); "
             f"locality was recorded before it. Paper's claims: " +
             "; ".join(CLAIMS.values()) + ".", "",
             "| answers | method | recall | (best, epochs) | " + _held_header(results) +
             " before → after | own Qs unchanged | never-stored answered with a stored value | exposures / fact | "
             "time | parameters |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(results):
        best = f"{_pct(r['best'])} at {r['best_epochs']:.0f}, lr {r['lr']:g}" \
            if r.get("best") is not None else ""
        lines.append(f"| {r['kind']} | {r['method']} | {_pct(r['recall'])}{_tf(r['recall_tf'])}"
                     f" | {best} | "
                     f"{_pct(r['ood_before'])} → {_pct(r['ood_after'])} | "
                     f"{_pct(r['own_unchanged'])}{_tf(r['own_unchanged_tf'])} | "
                     f"{_pct(r['halluc_after'])} | "
                     f"{r['exposures']:.1f} | {r['seconds']:.0f} s | {r['parameters']} |")
    lines += ["", "Greedy recall by the fact's max-token NLL (teacher-forced, after the "
                  "write), and the NLL below which recall is reliable (≥ 99%):", "",
              "| answers | method | reliable below | " + " | ".join(
                  _bins(results)) + " |", "|---|---|---|" + "---|" * len(_bins(results))]
    for kind, by in results["kinds"].items():
        for routing, run in by.items():
            methods = [(f"memory, {routing}", run)] + [
                (b, row) for b, row in run.get("baselines", {}).items()
                if "recall_by_max_nll" in row]
            for method, r in methods:
                lines.append(_nll_row(results, kind, method, r))
    if any(r["tuning"].get("trace") for by in results["kinds"].values() for r in by.values()):
        lines += ["", "The memory's tuning, at the step where the mean exposures per fact "
                      "first reach each count (greedy-right: every answer token the argmax, "
                      "read from the training loss, i.e. before that step's update):", "",
                  *trace_table(results)]
    lines += ["", "Plots: `recall_by_nll.png`, `recall_by_exposures.png` (the memory's "
                  "greedy-right fraction along its tuning, the baselines' greedy recall "
                  "along their epochs), `loss_percentiles.png` (the facts' max-token NLL "
                  "per step). Each run's own report: `KIND/ROUTING/report.md`.", ""]
    return "\n".join(lines)


def _held_header(results: dict) -> str:
    sets = {r.get("held_set") for r in rows(results)}
    return "general knowledge (answer in the reply)" if sets == {"general"} else "OOD"


def _nll_row(results, kind, method, r) -> str:
    cells = {f"[{b['nll_from']:.3g}, {b['nll_to']:.3g})":
             f"{_pct(b['recall'])} of {b['facts']}" if b["facts"] else ""
             for b in r["recall_by_max_nll"]}
    rb = r.get("reliable_below_nll")
    rb = "–" if rb is None else "every fact" if rb == float("inf") else f"{rb:.3g}"
    return (f"| {kind} | {method} | {rb} | " +
            " | ".join(cells.get(b, "") for b in _bins(results)) + " |")


def _bins(results: dict) -> list[str]:
    for by in results["kinds"].values():
        for r in by.values():
            return [f"[{b['nll_from']:.3g}, {b['nll_to']:.3g})" for b in r["recall_by_max_nll"]]
    return []


def _plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, xlabel, name):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greedy recall")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, by in results["kinds"].items():
        for routing, r in by.items():
            pts = [(i, b["recall"]) for i, b in enumerate(r["recall_by_max_nll"]) if b["facts"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{kind}, {routing}")
    ax.set_xticks(range(len(_bins(results))), _bins(results), rotation=45, fontsize=6)
    save(fig, ax, "max-token NLL of the fact (teacher-forced)", "recall_by_nll.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))  # memory: greedy-right (all argmax) along
    for kind, by in results["kinds"].items():  # its tuning; baselines: greedy recall
        for routing, r in by.items():  # measured every few epochs (= exposures per fact)
            tr = r["tuning"].get("trace") or []
            if tr:
                ax.plot([t["exposures_mean"] for t in tr], [t["argmax"] for t in tr],
                        label=f"{kind}, memory {routing} (teacher-forced all argmax)")
            for b, row in r.get("baselines", {}).items():
                if row.get("curve"):
                    ax.plot([c["epochs"] for c in row["curve"]],
                            [c["recall"] for c in row["curve"]], marker=".", ls="--",
                            label=f"{kind}, {b} (greedy)")
    ax.set_xscale("symlog", linthresh=1)
    save(fig, ax, "exposures per fact (mean; epochs for the baselines)",
         "recall_by_exposures.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, by in results["kinds"].items():
        for routing, r in by.items():
            tr = [t for t in r["tuning"].get("trace") or [] if t["nll_p50"] == t["nll_p50"]]
            if tr:
                x = [t["step"] for t in tr]
                line, = ax.plot(x, [t["nll_p50"] for t in tr], label=f"{kind}, {routing}: "
                                "median (band: 10th-90th percentile)")
                ax.fill_between(x, [t["nll_p10"] for t in tr], [t["nll_p90"] for t in tr],
                                color=line.get_color(), alpha=0.2)
    ax.axhline(_tau(results), color="k", lw=0.6, ls=":")  # tau: a fact is done below it
    ax.set_yscale("log")
    ax.set_xlabel("tuning step")
    ax.set_ylabel("max-token NLL of the facts seen (nats)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_percentiles.png", dpi=120)
    plt.close(fig)


def _tau(results: dict) -> float:
    for by in results["kinds"].values():
        for r in by.values():
            return float(r["settings"]["tau"])
    return 0.05


MILESTONES = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def trace_table(results: dict) -> list[str]:
    """Each memory run's trace at a few exposure counts: the facts greedy-right (all
    argmax, read from the loss), done (also under tau), and max-token NLL percentiles."""
    lines = ["| answers | routing | exposures / fact | step | greedy-right | done | "
             "max-token NLL p10 / p50 / p90 |", "|---|---|---|---|---|---|---|"]
    for kind, by in results["kinds"].items():
        for routing, r in by.items():
            tr = r["tuning"].get("trace") or []
            rows: list[dict] = []  # the first row reaching each count (each row once)
            for e in MILESTONES:
                t = next((t for t in tr if t["exposures_mean"] >= e), None)
                if t is not None and not any(t is x for x in rows):
                    rows.append(t)
            for t, end in [(t, "") for t in rows] + ([(tr[-1], " (end)")] if tr else []):
                lines.append(f"| {kind} | {routing} | {t['exposures_mean']:.1f}{end} | "
                             f"{t['step']:.0f} | {_pct(t['argmax'])} | {_pct(t['done'])} | "
                             f"{t['nll_p10']:.3g} / {t['nll_p50']:.3g} / {t['nll_p90']:.3g} |")
    return lines
