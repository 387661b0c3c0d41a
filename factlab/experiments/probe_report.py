"""The probing section of a recipe's report: a P-probe heatmap (task x position) per cell,
the Q-probe table with the paper's numbers beside ours, and how Q-probe accuracy tracks
OOD QA accuracy across the recipe's datasets (the paper's Result 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factlab.experiments.paper import (PAPER_P_PROBE_NOTE, PAPER_Q_PROBE, PAPER_Q_PROBE_NOTE,
                                       paper_probe_key)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def pearson(xs, ys) -> float | None:
    """Pearson's r, or None with fewer than 3 points or no variance."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def q_vs_qa_points(results: list[dict]) -> list[tuple[str, str, float, float]]:
    """(cell, attribute, Q-probe whole-value accuracy, OOD QA exact match) for every cell
    with a Q-probe and every attribute with a whole-value task."""
    pts = []
    for r in results:
        q = (r.get("probe") or {}).get("q")
        if not q:
            continue
        ood = r["ood"]["per_attribute"]
        for t in q["tasks"]:
            if t["target"] == "value" and t["attribute"] in ood and t["test"][0] is not None:
                pts.append((r["cell"], t["attribute"], t["test"][0], ood[t["attribute"]]))
    return pts


def probe_section(out: Path, results: list[dict], cells: dict) -> list[str]:
    """Markdown lines (and PNGs written into ``out``); empty when no cell was probed."""
    probed = [r for r in results if r.get("probe")]
    if not probed:
        return []
    lines = ["## Probing", "",
             "A frozen copy of each cell's BIO-pretrained model; a small probe (a low-rank "
             "update of the token embedding, a norm and a classifier: linear, or *tied* to "
             "the model's own output embedding) is trained on some people and scored on the "
             "others (accuracy %, held-out people). *chance*: always answering the most "
             "frequent training class. See `docs/probing.md`.", ""]
    for r in probed:
        p = r["probe"].get("p")
        if not p:
            continue
        c = cells[r["cell"]]
        key = paper_probe_key(c)
        png = _heatmap(out, r["cell"], p)
        sp = p["split"]
        lines += [f"### P-probe: {r['cell']}", "",
                  f"Bios of {sp['test']} held-out people (probe trained on {sp['train']}); "
                  f"position p_k is the token just before the k-th attribute value of the bio, "
                  f"*own* the one just before the task's own value; {p['train']['steps']} "
                  f"steps, embedding update {p['probe']['embedding']} rank "
                  f"{p['probe']['rank']}, {p['probe'].get('head', 'linear')} head."]
        if key in PAPER_P_PROBE_NOTE:
            lines += ["", f"Paper ({key}): {PAPER_P_PROBE_NOTE[key]}."]
        lines += ["", f"![P-probe {r['cell']}]({png.name})", "",
                  "| task | classes | chance | " + " | ".join(p["positions"]) + " | own |",
                  "|---" * (len(p["positions"]) + 4) + "|"]
        for t in p["tasks"]:
            lines.append(f"| {t['name']} | {t['classes']} | {_pct(t['chance'])} | " +
                         " | ".join(_pct(a) for a in t["test"]) + f" | {_pct(t.get('own'))} |")
        lines.append("")
    qs = [r for r in probed if r["probe"].get("q")]
    if qs:
        names = [t["name"] for t in qs[0]["probe"]["q"]["tasks"] if t["target"] != "first_token"]
        lines += ["### Q-probe: the end token of `<start> full name <end>`", "",
                  "Whole-value tasks (and birth month); each entry: ours (chance). "
                  "First-token tasks are in `CELL/probe_q.json`.", "",
                  "| cell | people (train/test) | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for r in qs:
            q = r["probe"]["q"]
            by = {t["name"]: t for t in q["tasks"]}
            cols = [f"{_pct(by[n]['test'][0])} ({_pct(by[n]['chance'])})" if n in by else "–"
                    for n in names]
            lines.append(f"| {r['cell']} | {q['split']['train']}/{q['split']['test']} | " +
                         " | ".join(cols) + " |")
        for key in dict.fromkeys(paper_probe_key(cells[r["cell"]]) for r in qs):
            if key in PAPER_Q_PROBE:
                pq = PAPER_Q_PROBE[key]
                cols = [f"{pq[n.split('/')[0]]:.1f}" if n.endswith("/value") and
                        n.split("/")[0] in pq else "–" for n in names]
                lines.append(f"| *paper: {key}* | 100k people | " + " | ".join(cols) + " |")
            elif key in PAPER_Q_PROBE_NOTE:
                lines.append(f"| *paper: {key}* | 100k people | " +
                             " | ".join(PAPER_Q_PROBE_NOTE[key] for _ in names) + " |")
        lines.append("")
        lines += _correlation(out, qs)
    return lines


def _correlation(out: Path, qs: list[dict]) -> list[str]:
    pts = q_vs_qa_points(qs)
    if not pts:
        return []
    r_all = pearson([p[2] for p in pts], [p[3] for p in pts])
    lines = ["### Q-probe accuracy vs OOD QA accuracy (paper's Result 5)", "",
             f"Pearson r over every (cell, attribute) pair with a whole-value task: "
             f"**{'–' if r_all is None else f'{r_all:.2f}'}** ({len(pts)} points; the paper "
             f"finds that Q-probe accuracy tracks QA accuracy across datasets)."]
    attrs = list(dict.fromkeys(p[1] for p in pts))
    per = {a: pearson([p[2] for p in pts if p[1] == a], [p[3] for p in pts if p[1] == a])
           for a in attrs}
    lines += ["", "| attribute | r across cells |", "|---|---|"]
    lines += [f"| {a} | {'–' if v is None else f'{v:.2f}'} |" for a, v in per.items()]
    lines += ["", "(– : fewer than 3 cells, or no variation.)", ""]
    png = _scatter(out, pts)
    lines += [f"![Q-probe vs OOD QA]({png.name})", ""]
    return lines


def _heatmap(out: Path, cell: str, res: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    acc = np.array([[np.nan if a is None else 100 * a for a in t["test"]] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.0 * acc.shape[1] + 3.5, 0.38 * len(tasks) + 1.3))
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if acc[i, j] < 60 else "black")
    ax.set_xticks(range(acc.shape[1]), res["positions"], fontsize=8)
    ax.set_yticks(range(len(tasks)),
                  [f"{t['name']} (chance {_pct(t['chance'])})" for t in tasks], fontsize=7)
    ax.set_title(f"P-probe accuracy (%), {cell}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    p = out / f"probe_p_{_slug(cell)}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _scatter(out: Path, pts) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for cell in dict.fromkeys(p[0] for p in pts):
        sel = [p for p in pts if p[0] == cell]
        ax.scatter([100 * p[2] for p in sel], [100 * p[3] for p in sel], label=cell, s=18)
    ax.set_xlabel("Q-probe accuracy, whole value (%)")
    ax.set_ylabel("OOD QA exact match (%)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "probe_q_vs_qa.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
