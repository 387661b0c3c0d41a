"""report.md + PNG plots from a recipe's results (the paper's numbers beside ours)."""

from __future__ import annotations

from pathlib import Path

from factlab.experiments.paper import PAPER_OOD_ATTR, paper_inverse_note, paper_mean
from factlab.experiments.recipe import packing_segments
from factlab.io import atomic_write_text


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def bio_memorised(result: dict) -> float | None:
    """The last bio first-token accuracy (P_test) logged by the first training stage."""
    for rows in result.get("curves", {}).values():
        vals = [row["eval/bio_first_token/test"] for row in rows
                if "eval/bio_first_token/test" in row]
        return vals[-1] if vals else None
    return None


def write_report(out: Path, recipe, results: list[dict]) -> Path:
    """The report: the section of every stage kind, in the registry's order
    (``factlab.experiments.stages``); a section shows the results that have its numbers
    and is empty when none has."""
    from factlab.experiments.stages import STAGES

    cells = {c.name: c for c in recipe.cells}
    lines = [f"# {recipe.name}", "", recipe.description.strip(), ""]
    for st in STAGES.values():
        if st.section is not None:
            lines += st.section(out, recipe, results, cells)
    lines += ["Raw numbers: `results.json`; every prediction: `CELL/predictions_*.jsonl`; "
              "training logs: `CELL/*/metrics.jsonl`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def extraction_section(out: Path, recipe, results: list[dict], cells: dict) -> list[str]:
    """The extract stage's tables: OOD per attribute with the paper's numbers, bios
    memorised / ID / held-out phrasing, the run, plots."""
    results = [r for r in results if "ood" in r]
    if not results:
        return []
    attrs = list(results[0]["ood"]["per_attribute"]) if results else []
    user = any(getattr(cells[r["cell"]].world, "facts", None) for r in results)
    lines = ["## OOD QA accuracy (P_test, exact match of the whole answer, %)", "",
             "| cell | regime | bios | " + " | ".join(attrs) + " | **mean** |" +
             ("" if user else " paper mean |"), "|---" * (len(attrs) + 4 + (not user)) + "|"]
    for r in results:
        c = cells[r["cell"]]
        paper = paper_mean(c)
        per = r["ood"]["per_attribute"]
        pa = PAPER_OOD_ATTR.get(c.world.augment, {}) if c.regime != "mixed" and not user \
            else {}
        cols = [_pct(per.get(a)) + (f" (paper {pa[a]:.0f})" if a in pa else "") for a in attrs]
        lines.append(f"| {r['cell']} | {r['regime']} | {r['augment']} | " + " | ".join(cols) +
                     f" | **{_pct(r['ood']['exact_match'])}** |" +
                     ("" if user else f" {'–' if paper is None else f'{paper:.1f}'} |"))
    if user:
        lines += ["", "A world made from your fact file: the paper measured bioS biographies "
                  "only, so no paper numbers are shown. Compare the cells with each other: "
                  "the paper's claim is the *direction* (augmented bios extract better than "
                  "single ones), and here it is measured on your facts.", ""]
    else:
        lines += ["", "The paper's numbers: GPT-2 small (124M parameters) on 100k people, 80k "
                  "pretraining steps (Allen-Zhu & Li 2023, Part 3.1, Fig. 3 / Tab. 1). Ours: "
                  "the model, world and steps of this recipe (below) — compare the *direction "
                  "and size of the effect*, not the absolute level, when the scale differs.",
                  ""]
    inv = [r for r in results if "ood_inverse" in r]
    if inv:
        lines += ["## Inverse search (Part 3.2, exact match of the full name, %)", "",
                  "The question gives all six values and asks who it is (\"Who was born on "
                  "... in ..., studied ... at ..., and worked for ... in ...?\"); trained on "
                  "P_train people's, asked about P_test people's.", "",
                  "| cell | bios | inverse ID (P_train) | **inverse OOD (P_test)** | forward "
                  "OOD | paper, inverse |", "|---|---|---|---|---|---|"]
        for r in inv:
            lines.append(f"| {r['cell']} | {r['augment']} | "
                         f"{_pct(r['id_inverse']['exact_match'])} | "
                         f"**{_pct(r['ood_inverse']['exact_match'])}** | "
                         f"{_pct(r['ood']['exact_match'])} | "
                         f"{paper_inverse_note(cells[r['cell']])} |")
        lines.append("")
    lines += ["## Memorisation, in-distribution and held-out phrasing (%)", "",
              "*bios memorised*: first-token accuracy of the attribute values inside the "
              "bios of P_test people at the end of BIO pretraining (or mixed training) — "
              "extraction can only be as good as this.", "",
              "| cell | bios memorised (P_test) | ID exact match (P_train) | ID, held-out "
              "question phrasing | OOD |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['cell']} | {_pct(bio_memorised(r))} | {_pct(r['id']['exact_match'])} | "
                     f"{_pct(r['id_paraphrase']['exact_match'])} | {_pct(r['ood']['exact_match'])} |")
    lines += ["", "## Run", "", "| cell | people | parameters | stages (steps) | tokens/s | "
              "wall time |", "|---|---|---|---|---|---|"]
    for r in results:
        c = cells[r["cell"]]
        st = ", ".join(f"{k} {v[-1][0] if v else 0}" for k, v in r["loss"].items())
        tps = ", ".join(f"{k} {v:,.0f}" for k, v in r["tokens_per_s"].items())
        lines.append(f"| {r['cell']} | {r['people']} | {r['params']:,} | {st} | {tps} | "
                     f"{r['seconds']:.0f} s |")
    c0 = recipe.cells[0] if recipe.cells else None
    if c0 is not None:
        lines += ["", f"Model: {c0.model.arch} / {c0.model.size}, context {c0.model.context}; "
                  f"tokenizer vocab {c0.tokenizer.vocab_size}; pretrain {c0.pretrain.steps} "
                  f"steps x {c0.pretrain.batch_size} seqs, lr {c0.pretrain.lr}, bios packed "
                  f"{_packing(c0)}; finetune "
                  f"{c0.finetune.mode} {c0.finetune.steps} steps x {c0.finetune.batch_size}, "
                  f"lr {c0.finetune.lr}.", ""]
    plots = _plots(out, results, cells)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return lines


def _plots(out: Path, results: list[dict], cells) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # OOD accuracy per cell, ours vs paper
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(results) + 2), 3.2))
    xs = range(len(results))
    ours = [100 * r["ood"]["exact_match"] for r in results]
    paper = [paper_mean(cells[r["cell"]]) for r in results]
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="factlab")
    if any(p is not None for p in paper):  # none for a user's fact world
        ax.bar([x + 0.2 for x in xs], [p if p is not None else 0 for p in paper], 0.4,
               label="paper", alpha=0.6)
    ax.set_xticks(list(xs), [r["cell"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("OOD QA accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "ood_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # training curves: loss and first-token accuracies per stage
    for r in results:
        stages = list(r["loss"])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        offset = 0
        for st in stages:
            loss = r["loss"][st]
            if loss:
                axes[0].plot([s + offset for s, _ in loss], [v for _, v in loss], label=st)
            keys = sorted({k for row in r["curves"].get(st, []) for k in row
                           if k.startswith("eval/")})
            for k in keys:
                pts = [(row["step"] + offset, row[k]) for row in r["curves"][st] if k in row]
                axes[1].plot([a for a, _ in pts], [100 * b for _, b in pts], marker=".",
                             label=f"{st}: {k[5:]}")
            offset += loss[-1][0] if loss else 0
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("training loss")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].set_ylim(-2, 102)
        axes[1].legend(fontsize=6)
        fig.suptitle(r["cell"], fontsize=9)
        fig.tight_layout()
        p = out / f"curves_{''.join(ch if ch.isalnum() else '_' for ch in r['cell'])}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _packing(cell) -> str:
    segs = packing_segments(cell.packing, cell.pretrain.steps)
    return segs[0][0] if len(segs) == 1 else " then ".join(f"{p} ({n} steps)" for p, n in segs)

