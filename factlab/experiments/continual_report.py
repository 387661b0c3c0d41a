"""The report of a continual run (``factlab run continual``): one table per metric family
with every method in rows, the accuracy matrices (and their heatmaps), the base world's
accuracy after each experience, costs, and the settings; ``results.json`` beside it holds
every number, and each is recomputable from ``METHOD/predictions/``.
"""

from __future__ import annotations

from pathlib import Path

from factlab.io import atomic_write_text

ANCHORS = ("Anchors (other settings, for orientation only): CKL (T5-large, news) FUAR "
           "vanilla ~1.08, RecAdam ~0.84, Mix-Review ~1.30, LoRA ~0.44, K-Adapter ~0.33, "
           "Modular ~0.28; LM continual benchmarks (T5-large, 4 classification tasks, as "
           "tabulated by O-LoRA; unconfirmed) multitask 80.0, replay ~57.8, LwF ~52.3, EWC "
           "~50.3, sequential ~28.5; prompt pools (vision, Split CIFAR-100, no rehearsal) "
           "L2P 83.83 average accuracy / 7.63 forgetting, DualPrompt 86.51 / 5.16, joint "
           "~90.85; text (T5-large) O-LoRA 75.8 vs multitask 80.0, L2P ~60.7.")


def _p(x, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _pp(x) -> str:
    """A difference of accuracies in percentage points."""
    return "–" if x is None else f"{100 * x:+.1f} pp"


def select_lines(select: dict) -> list[str]:
    """The settings each method chose on the validation stream, with every candidate."""
    rows = [(m, k, scores, rec["chosen"][k]) for m, rec in select.items() if rec
            for k, scores in rec.get("scores", {}).items()]
    if not rows:
        return []
    lines = ["## Settings chosen on the validation stream", "",
             "| method | setting | candidates: base / new / score (%) | chosen |",
             "|---|---|---|---|"]
    for m, k, scores, chosen in rows:
        cand = "; ".join(f"{x['value']:g}: {100 * x['base']:.0f} / {100 * x['new']:.0f} / "
                         f"{100 * x['score']:.1f}" for x in scores)
        lines.append(f"| {m} | {k} | {cand} | {chosen:g} |")
    return lines + ["", "Validation stream: the base world plus one fresh cohort (seed + "
                    "1000), never a reported stream; score = mean of the base world's and the "
                    "new cohort's exact match after that one experience.", ""]


def tables(res: dict) -> list[str]:
    ms = res["methods"]
    T = ms[0]["T"]
    kinds = ms[0]["kinds"]
    lines = []
    s = res["settings"]
    st = res["stream"]
    lines += [f"Stream: base world + {T} experiences ({', '.join(kinds)}); base: "
              f"{(st.get('base') or {}).get('cell', '?')}. Every method: {s['steps']} steps "
              f"of {s['batch_size']} rows per experience (joint: {T} x {s['steps']} at once), "
              f"lr {s['lr']} (LoRA {s['lora']['lr']}), a row is one question with "
              f"probability {s['qa_ratio']}, else one whole bio; seed {s['seed']}. "
              f"**One seed and one order rank nothing**: this run shows what the methods do, "
              f"not which is best.", ""]
    lines += ["## Accuracy matrix (exact match; columns: base world, then each experience's "
              "facts; rows: after each experience)", "",
              "| method | A_T | avg. incremental | learning acc. (diagonal) | forgetting "
              "(Chaudhry) | BWT | FWT (≈ 0 expected) | base world R[0,0] → R[T,0] | base "
              "forgetting |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
        sm, R = m["summary"]["matrix_summary"], m["summary"]["matrix"]
        lines.append(f"| {m['method']} | {_p(sm['average_accuracy'])} | "
                     f"{_p(sm['average_incremental_accuracy'])} | "
                     f"{_p(sm['learning_accuracy'])} | {_pp(sm['forgetting'])} | "
                     f"{_pp(sm['bwt'])} | {_pp(sm['fwt'])} | {_p(R[0][0])} → {_p(R[T][0])} | "
                     f"{_pp(sm['base_forgetting'])} |")
    lines += ["", "Forgetting (Chaudhry et al. 2018) = mean over j < T of max_{j≤l<T} R[l,j] − "
              "R[T,j], read beside the learning accuracy (a method that learns nothing "
              "forgets nothing); BWT = mean_{j<T} R[T,j] − R[j,j]; FWT = mean_{j≥2} R[j−1,j] − "
              "R[0,j] (new people are i.i.d., so ≈ 0 by construction); joint training has "
              "only rows 0 and T. Row 0 on new facts is a guess: "
              + (f"chance ≈ {_p(res['chance'])}" if res.get("chance") is not None else "") +
              " (small value pools), not leakage.", ""]
    lines += ["## Learned from QA (ID: the cohort's P_train) vs from text only (OOD: P_test)",
              "", "| method | learning acc. ID | learning acc. OOD | A_T ID | A_T OOD |",
              "|---|---|---|---|---|"]
    for m in ms:
        a, b = m["summary"]["matrix_summary_id"], m["summary"]["matrix_summary_ood"]
        lines.append(f"| {m['method']} | {_p(a['learning_accuracy'])} | "
                     f"{_p(b['learning_accuracy'])} | {_p(a['average_accuracy'])} | "
                     f"{_p(b['average_accuracy'])} |")
    lines += ["", "## Updates and new facts (CKL metrics, after the last experience)", "",
              "| method | invariant retention (before → after) | update success | stale-answer "
              "rate (before → after) | new acquisition | FUAR (lower is better) |",
              "|---|---|---|---|---|---|"]
    for m in ms:
        c = m["summary"]["ckl"]
        fuar = "–" if c["fuar"] is None else f"{c['fuar']:.2f}"
        if c.get("fuar_note"):
            fuar += f" ({c['fuar_note']})"
        lines.append(f"| {m['method']} | {_p(c['invariant_before'])} → "
                     f"{_p(c['invariant_retention'])} | {_p(c['update_success'])} | "
                     f"{_p(c['stale_before'])} → {_p(c['stale_rate'])} | "
                     f"{_p(c['new_acquisition'])} | {fuar} |")
    c0 = ms[0]["summary"]["ckl"]
    lines += ["", f"FUAR = forgotten / (updated + acquired), counted in facts: invariant facts "
              f"right before and wrong after, updated facts right after and not before, new "
              f"facts right after and not before ({c0['n_invariant']} invariant, "
              f"{c0['n_updated']} updated, {c0['n_new']} new test facts).", "",
              "## Hallucination (unknown people: never in any text)", "",
              "| method | confident answers on unknown people | on known people | AUROC "
              "known vs unknown (answer log-prob) | threshold (chosen on validation people) | "
              "wrong answers that are another person's value (chance) |",
              "|---|---|---|---|---|---|"]
    for m in ms:
        h, ct = m["summary"].get("hallucination"), m["summary"].get("contamination")
        hs = ["–"] * 4 if not h else [_p(h["confident_unknown_rate"]),
                                      _p(h["confident_known_rate"]),
                                      "–" if h["auroc"] is None else f"{h['auroc']:.3f}",
                                      f"{h['threshold']:.2f}"]
        cs = "–" if not ct or ct.get("rate") is None else \
            f"{_p(ct['rate'])} ({_p(ct.get('chance'))}; {ct['n_wrong']} wrong)"
        lines.append(f"| {m['method']} | " + " | ".join(hs) + f" | {cs} |")
    lines += ["", "The threshold is chosen on even-numbered people (known and unknown) to "
              "maximise balanced accuracy; rates and AUROC are on odd-numbered ones. A "
              "contamination rate near its chance level says little: with small value pools "
              "almost any wrong answer is somebody's value.", ""]
    gen = [m for m in ms if m["cost"].get("generative")]
    if gen:
        lines += ["## Generative replay: are the pseudo-bios true?", "",
                  "| method | before experience | pseudo-bios (tokens) | facts read | of people "
                  "the model had met | true | precision (all facts / met people's) | "
                  "invented people's facts | unknown people's | sentences not read |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in gen:
            for t, g in sorted(m["cost"]["generative"].items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {m['method']} | {t} | {g['generated']} ({g['tokens']:,}) | "
                    f"{g.get('facts', '–')} | {g.get('facts_of_known_people', '–')} | "
                    f"{g.get('true', '–')} | {_p(g.get('precision'))} / "
                    f"{_p(g.get('precision_known_people'))} | "
                    f"{g.get('invented_person_facts', '–')} | "
                    f"{g.get('unknown_person_facts', '–')} | {g.get('unread_sentences', '–')} |")
        lines += ["", "A pseudo-fact is true when its person is one the model had met (base "
                  "world or an earlier cohort) and its value is that person's value before the "
                  "experience; the bios are read back with the world's templates "
                  "(factlab.text.parse). A false pseudo-fact is trained on as if it were true.",
                  ""]
    lines += prompt_lines(ms) + routing_lines(ms)
    lines += ["## Costs", "",
              "| method | trainable params | buffer (examples / facts / tokens) | extra forward "
              "per row | extra backward examples | train s | eval s |",
              "|---|---|---|---|---|---|---|"]
    for m in ms:
        c, sec = m["cost"], m["seconds"]
        buf = "–" if not c["buffer_examples"] else \
            f"{c['buffer_examples']:,} / {c['buffer_facts']:,} / {c['buffer_tokens']:,}"
        lines.append(f"| {m['method']} | {c['trainable_params']:,} | {buf} | "
                     f"{c['extra_forward_per_row']:g} | {c['extra_backward_examples']:,} | "
                     f"{sec['train']:.0f} | {sec['eval']:.0f} |")
    lines += [""] + select_lines({m["method"]: m.get("select") for m in ms})
    lines += ["## Accuracy matrices", ""]
    for m in ms:
        R = m["summary"]["matrix"]
        head = "| after \\ facts of | base | " + " | ".join(
            f"{j}: {k}" for j, k in enumerate(kinds, start=1)) + " |"
        lines += [f"**{m['method']}**", "", head, "|---" * (T + 2) + "|"]
        for t, row in enumerate(R):
            if all(x is None for x in row):
                continue
            lines.append(f"| {t} | " + " | ".join(_p(x) for x in row) + " |")
        lines.append("")
    lines += [ANCHORS, ""]
    return lines


def _hist(counts) -> str:
    tot = sum(counts) or 1
    return " ".join(f"{100 * c / tot:.0f}" for c in counts)


def prompt_lines(ms: list[dict]) -> list[str]:
    """Prompt pools: the usage histogram per experience and the matching rate."""
    pools = [m for m in ms if m.get("prompts")]
    if not pools:
        return []
    lines = ["## Prompt pools: which prompts each experience used, and do test facts find "
             "them?", "",
             "| method | prompt positions | query layer | prompt usage in training, % of "
             "selections per prompt (experience 1; 2; …) | matching rate: new / updated facts "
             "| prompts the base world's facts select (%) |", "|---|---|---|---|---|---|"]
    for m in pools:
        p = m["prompts"]
        use = "; ".join(_hist(u) for u in p["usage"][1:] if sum(u))
        if p["kind"] == "coda":
            match = "– (CODA: mean weight per component " + " ".join(
                f"{a:.2f}" for a in p.get("mean_alpha", [])) + ")"
            use = "– (no selection: every component weighted)"
        else:
            mb = p.get("matching_rate_by_label") or {}
            match = f"{_p(mb.get('new'))} / {_p(mb.get('updated'))}"
        inv = _hist(p["invariant_selection"]) if p.get("invariant_selection") else "–"
        lines.append(f"| {m['method']} | {p['prompt_positions']} | {p['query_layer']} | {use} "
                     f"| {match} | {inv} |")
    lines += ["", "Selection is per example at training and at test time (no batch vote). "
              "The prompts of experience t are the top-N it selected most in training; the "
              "matching rate is the share of a test fact's selected prompts that are its "
              "experience's. The base world's facts get prompts too: nothing trained them "
              "for those questions.", ""]
    return lines


def routing_lines(ms: list[dict]) -> list[str]:
    """Per-experience adapters: routing accuracy by label, the learned router's exact match
    beside an oracle router's."""
    rs = [m for m in ms if m.get("routing")]
    if not rs:
        return []
    labs = ("invariant", "updated", "new", "unknown")
    lines = ["## Per-experience adapters: does the router find the right one?", "",
             "| method | routing accuracy (known people) | by label: " + " / ".join(labs) +
             " | by true experience (0 = base) | exact match, learned router | with an "
             "oracle router | oracle by label: " + " / ".join(labs[:3]) +
             " | adapters (params added per experience) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in rs:
        r, c = m["routing"], m["cost"]
        bl = r["routing_accuracy_by_label"]
        ob = r["exact_match_oracle_by_label"]
        be = r.get("routing_accuracy_by_experience") or {}
        lines.append(f"| {m['method']} | {_p(r['routing_accuracy_known'])} | "
                     + " / ".join(_p(bl.get(k)) for k in labs) + " | "
                     + (" / ".join(f"{e}: {_p(v)}" for e, v in be.items()) or "–") + " | "
                     f"{_p(r['exact_match_router'])} | {_p(r['exact_match_oracle'])} | "
                     + " / ".join(_p(ob.get(k)) for k in labs[:3]) +
                     f" | {c.get('adapters', '–')} ({c.get('added_params_per_experience', 0):,}) |")
    lines += ["", "The true experience of a test fact: its cohort's (new facts) or its "
              "update's (updated facts); the base world, no adapter, for invariant facts and "
              "for unknown people. The oracle router answers every question with its true "
              "experience's adapter; exact match over known people's facts after the last "
              "experience.", ""]
    return lines


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ms = res["methods"]
    T = ms[0]["T"]
    made = []
    fig, axes = plt.subplots(1, len(ms), figsize=(2.6 * len(ms), 2.8), squeeze=False)
    for ax, m in zip(axes[0], ms):
        R = np.array([[np.nan if x is None else x for x in r] for r in m["summary"]["matrix"]])
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(R):
            if not np.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 else "k")
        ax.set_title(m["method"], fontsize=9)
        ax.set_xticks(range(T + 1), ["base"] + [str(j) for j in range(1, T + 1)], fontsize=7)
        ax.set_yticks(range(T + 1), [str(t) for t in range(T + 1)], fontsize=7)
        ax.set_xlabel("facts of", fontsize=7)
    axes[0][0].set_ylabel("after experience", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "R_heatmaps.png", dpi=110)
    plt.close(fig)
    made.append("R_heatmaps.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m in ms:
        R = m["summary"]["matrix"]
        pts = [(t, r[0]) for t, r in enumerate(R) if r[0] is not None]
        ax.plot(*zip(*pts), marker="o", label=m["method"])
    ax.set_xlabel("after experience")
    ax.set_ylabel("base world exact match")
    ax.set_xticks(range(T + 1))
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "base_accuracy.png", dpi=110)
    plt.close(fig)
    made.append("base_accuracy.png")
    return made


def write_report(res: dict, out) -> str:
    """Write ``OUT/report.md`` and its plots; returns the markdown."""
    out = Path(out)
    lines = ["# Continual knowledge learning", ""] + tables(res)
    try:
        pngs = plots(res, out)
    except ImportError:  # matplotlib is optional
        pngs = []
    lines += [f"![{p}]({p})" for p in pngs]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    return text


def write_full_report(res: dict, out) -> str:
    """``OUT/report.md`` of ``factlab run continual-full``: mean ± spread (sample std over
    the seeds x orders) of each metric per method, the ranking by mean A_T with the base
    world, the settings chosen on the validation stream, and every cell's A_T."""
    from factlab.experiments.continual import FULL_METRICS

    out = Path(out)
    agg, cells, s = res["aggregate"], res["cells"], res["settings"]
    n = len(cells)
    pct = {"FUAR", "AUROC known/unknown"}

    def cell(v, label):
        if v["mean"] is None:
            return "–"
        if label in pct:
            m = f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v["std"] is not None else "")
        else:
            m = f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] is not None
                                            else "")
        return m + (f" (n={v['n']})" if v["n"] != n else "")

    lines = ["# Continual knowledge learning: seeds x orders", "",
             f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}) x {len(s['orders'])} "
             f"orders ({'; '.join(', '.join(o) for o in s['orders'])}) = {n} streams from the "
             f"base {s['base']}; every method {s['steps']} steps of {s['batch_size']} rows per "
             f"experience (joint: all at once), lr {s['lr']} (LoRA {s['lora']['lr']}). Numbers "
             f"are mean ± sample standard deviation over the {n} streams, in % (FUAR and AUROC "
             f"as ratios); the seed changes the cohorts, the updated people and the training "
             f"order, not the base model.", "",
             "| method | " + " | ".join(lab for lab, _, _ in FULL_METRICS) + " |",
             "|---" * (len(FULL_METRICS) + 1) + "|"]
    order = sorted(agg, key=lambda m: -(agg[m]["A_T (with base)"]["mean"] or -1))
    for m in order:
        lines.append(f"| {m} | " + " | ".join(cell(agg[m][lab], lab)
                                               for lab, _, _ in FULL_METRICS) + " |")
    lines += ["", "Ranking by mean A_T with the base world (the mean over every column of the "
              "last row: base world and each experience): " +
              " > ".join(f"{m} ({100 * agg[m]['A_T (with base)']['mean']:.1f})" for m in order)
              + ". Where two means differ by less than their spreads the order between them is "
              "not established.", ""]
    lines += select_lines(res.get("select") or {})
    lines += ["## A_T with the base world, per stream", "",
              "| method | " + " | ".join(c["name"] for c in cells) + " |",
              "|---" * (n + 1) + "|"]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(
            _p(agg[m]["A_T (with base)"]["values"][i]) for i in range(n)) + " |")
    lines += ["", ANCHORS, ""]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    return text
