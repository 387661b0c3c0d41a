"""One reproduction table from run directories: every Part 3.1 (and 3.2 inverse-search,
3.3 capacity) number the paper reports beside the measured one, the mean and spread over the runs
(seeds) given, and the scale each was measured at. ``factlab reproduce RUN... --out
docs/reproduction.md`` writes it; nothing in it is typed by hand.

Runs are grouped by recipe name, cell name and the cell's settings: two runs of one cell
that differ only in their seeds are averaged as seeds; runs of one cell with other
settings (``mix=sequence`` against the recipe's ``mix: batch``, other steps) get a row each,
labelled by the settings that differ. A recipe with no run given is listed as not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factlab.errors import FactlabError
from factlab.experiments.paper import (PAPER_OOD_MEAN, PAPER_P_PROBE_NOTE, PAPER_Q_PROBE,
                                       paper_inverse_note)
from factlab.experiments.report import bio_memorised
from factlab.io import atomic_write_text
from factlab.train.config import CADENCE_FIELDS

# pairs of Figure 3 cells the paper puts at least this many points apart must keep their
# order on the mean over seeds; closer pairs are reported with their spread. A measured
# gap within the pair's spread (or under TIE points) is a tie, which a strict pair fails
STRICT_GAP = 20.0
TIE = 2.0
FIG3 = ["single+permute1", "single", "multi5", "single+permute5", "multi5+permute",
        "single+fullname", "multi5+permute+fullname"]
PAPER_BIOS_PEOPLE, PAPER_PARAMS = 100_000, 124_000_000
SHIPPED = ("quickstart", "fig3", "mixed", "celebrity", "reverse", "capacity")


@dataclass
class Run:
    dir: Path
    recipe: object  # factlab.experiments.recipe.Recipe
    results: list[dict]

    @property
    def name(self) -> str:
        """The shipped recipe this run is of: a copy named after one (``mixed-long``,
        ``capacity-n4000``) counts as a run of it, so its cells join that recipe's
        table (the copy's own name stays in the scale table)."""
        own = self.recipe.name
        return next((n for n in SHIPPED if own == n or own.startswith(n + "-")), own)

    def cell(self, name: str):
        return next((c for c in self.recipe.cells if c.name == name), None)

    def result(self, name: str) -> dict | None:
        return next((r for r in self.results if r["cell"] == name), None)

    def seed(self, name: str) -> str:
        c = self.cell(name)
        return f"{c.world.seed}/{c.pretrain.seed}" if c is not None else "?"


def load_run(path: str | Path) -> Run:
    from factlab.config import build, load_yaml
    from factlab.experiments.recipe import Recipe

    p = Path(path)
    if not (p / "results.json").is_file() or not (p / "recipe.yaml").is_file():
        raise FactlabError(f"{p}: not a finished run directory (needs recipe.yaml and "
                           f"results.json; `factlab run RECIPE --out {p}` makes one)")
    recipe = build(Recipe, load_yaml(p / "recipe.yaml"), source=str(p / "recipe.yaml"))
    results = json.loads((p / "results.json").read_text())
    return Run(p, recipe, results)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _stats(vals: list[float]) -> tuple[float | None, float | None]:
    """Mean and spread (half the range) of fractions, in percent."""
    v = [100 * x for x in vals if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (max(v) - min(v)) / 2


def _mean_spread(vals) -> str:
    m, s = _stats(vals)
    if m is None:
        return "–"
    return f"{m:.1f}" if len(vals) < 2 else f"{m:.1f} ± {s:.1f}"


def _cells(runs: list[Run], recipe: str, cell: str) -> list[tuple[Run, dict]]:
    return [(r, res) for r in runs if r.name == recipe
            for res in [r.result(cell)] if res is not None]


# settings that do not make two runs of a cell different experiments: seeds are what the
# table averages over; threads, evaluation batch sizes and how often a run logs,
# evaluates or checkpoints change only the speed and the record; the probe stage reads the
# pretrained model without changing it
NOT_A_SETTING = {"seed", "threads", "name", "probe", "batch_size@eval", *CADENCE_FIELDS}


def _flat(d, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k in NOT_A_SETTING or f"{k}@{prefix[:-1]}" in NOT_A_SETTING:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


def _settings(run: Run, cell: str) -> dict[str, object]:
    c = run.cell(cell)
    return {} if c is None else _flat(c.model_dump(mode="json"))


def _variants(runs_cells) -> list[tuple[str, list[tuple[Run, dict]]]]:
    """Split one cell's runs by their settings (seeds aside): ``[(label, runs_cells)]`` in
    the order first given; the label names the settings where the groups differ (empty
    when every run has the same settings, the usual case of seeds)."""
    groups: dict[str, list] = {}
    flats: dict[str, dict] = {}
    for r, res in runs_cells:
        f = _settings(r, res["cell"])
        key = json.dumps(f, sort_keys=True)
        groups.setdefault(key, []).append((r, res))
        flats[key] = f
    if len(groups) < 2:
        return [("", list(runs_cells))]
    keys = sorted({k for f in flats.values() for k in f})
    differ = [k for k in keys if len({flats[g].get(k) for g in groups}) > 1]
    # a section set in one run and absent (None) in another is named once, not per key
    differ = [k for k in differ if not any(k.startswith(d + ".") for d in differ)]
    out = []
    for g, rc in groups.items():
        f = flats[g]
        label = ", ".join(f"{k}={json.loads(f[k]) if k in f else '–'}" for k in differ)
        out.append((label, rc))
    return out


def _reason(runs_cells, ours: float | None, paper: float | None) -> str:
    """A measured reason where ours and the paper's differ by more than 10 points."""
    if ours is None or paper is None or abs(ours - paper) <= 10:
        return ""
    mem = [bio_memorised(res) for _, res in runs_cells]
    mem = [m for m in mem if m is not None]
    if mem and min(mem) < 0.9:
        return f"bios only {100 * min(mem):.0f}% memorised"
    _, res = runs_cells[0]
    scale = (f"scale: {res['people']:,} people (paper {PAPER_BIOS_PEOPLE:,}), "
             f"{res['params'] / 1e6:.1f}M parameters (paper 124M)")
    ids = [r["id"]["exact_match"] for _, r in runs_cells if "id" in r]
    if ids and min(ids) >= 0.95 and ours < 30 <= paper:
        return f"P_train's answers learnt (ID {100 * min(ids):.0f}%), the lookup not; {scale}"
    if mem and min(mem) < 0.97:
        return f"bios {100 * min(mem):.0f}% memorised; {scale}"
    return scale


def _row(runs_cells, key: str = "ood") -> tuple[list[float], str]:
    vals = [res[key]["exact_match"] for _, res in runs_cells if key in res]
    per = ", ".join(f"{_pct(res[key]['exact_match'])} (seed {r.seed(res['cell'])})"
                    for r, res in runs_cells if key in res)
    return vals, per


def _grid(runs: list[Run], recipe: str, cells: list[str], paper, title: str) -> list[str]:
    """One row per cell (and per distinct setting of it); ``paper``: the paper's number by
    cell name, or a function of (name, cell config) giving it."""
    lines = [f"## {title}", "",
             "| cell | paper OOD | **factlab OOD** (mean ± half-range) | each run | bios "
             "memorised | reason for a gap |", "|---|---|---|---|---|---|"]
    for name in cells:
        for label, rc in _variants(_cells(runs, recipe, name)):
            vals, per = _row(rc)
            mean, _ = _stats(vals)
            p = paper(name, rc[0][0].cell(name)) if callable(paper) else paper.get(name)
            mem = _mean_spread([bio_memorised(res) for _, res in rc])
            row = f"{name} ({label})" if label else name
            lines.append(f"| {row} | {'–' if p is None else f'{p:.1f}'} | "
                         f"**{_mean_spread(vals)}** | {per} | {mem} | {_reason(rc, mean, p)} |")
    return lines + [""]


def _ordering(runs: list[Run]) -> list[str]:
    means, other = {}, []
    for name in FIG3:
        if name in PAPER_OOD_MEAN:
            variants = _variants(_cells(runs, "fig3", name))
            if not variants[0][1]:
                continue
            other += [f"{name} ({label})" for label, _ in variants[1:]]
            m, s = _stats([res["ood"]["exact_match"] for _, res in variants[0][1]])
            if m is not None:
                means[name] = (m, s)
    names = [n for n in FIG3 if n in means]
    if len(names) < 2:
        return []
    lines = ["### The Figure 3 ordering", "",
             f"Every pair of cells the paper measured; pairs it puts ≥ {STRICT_GAP:.0f} points "
             "apart must keep its order on the mean (*strict*), closer pairs are shown with "
             f"their spread; a gap within the spread or under {TIE:.0f} points is a tie."
             + (" Each cell at the settings of its first run given; left out: "
                + ", ".join(other) + "." if other else ""), "",
             "| lower (paper) | higher (paper) | paper gap | factlab gap | kind | held |",
             "|---|---|---|---|---|---|"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lo, hi = sorted((a, b), key=lambda n: PAPER_OOD_MEAN[n])
            gap = PAPER_OOD_MEAN[hi] - PAPER_OOD_MEAN[lo]
            ours = means[hi][0] - means[lo][0]
            spread = means[hi][1] + means[lo][1]
            strict = gap >= STRICT_GAP
            tie = abs(ours) <= max(spread, TIE)
            held = "tie" if tie else ("yes" if ours > 0 else "**no**")
            if strict and tie:
                held = "**no** (tie)"
            lines.append(f"| {lo} ({PAPER_OOD_MEAN[lo]:.1f}) | {hi} ({PAPER_OOD_MEAN[hi]:.1f})"
                         f" | {gap:.1f} | {ours:+.1f} (spread {spread:.1f}) | "
                         f"{'strict' if strict else 'close'} | {held} |")
    return lines + [""]


def _inverse(runs: list[Run]) -> list[str]:
    rows = [(r, res) for r in runs if r.name == "reverse" for res in r.results
            if "ood_inverse" in res]
    if not rows:
        return []
    lines = ["## Inverse search (Part 3.2, `reverse`)", "",
             "| cell | bios | paper, inverse | **inverse OOD** | each run | forward OOD | "
             "bios memorised |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(res["cell"] for _, res in rows):
        for label, rc in _variants([(r, res) for r, res in rows if res["cell"] == name]):
            vals, per = _row(rc, "ood_inverse")
            fwd, _ = _row(rc, "ood")
            row = f"{name} ({label})" if label else name
            lines.append(f"| {row} | {rc[0][1]['augment']} | "
                         f"{paper_inverse_note(rc[0][0].cell(name))}"
                         f" | **{_mean_spread(vals)}** | {per} | {_mean_spread(fwd)} | "
                         f"{_mean_spread([bio_memorised(res) for _, res in rc])} |")
    return lines + [""]


def _probe_of(res: dict, kind: str) -> dict | None:
    return (res.get("probe") or {}).get(kind)


def _probe_how(pr: dict) -> str:
    return (f"{pr['probe'].get('head', 'linear')} head, {pr['split']['train']} probe-train "
            f"people, {pr['train']['steps']} steps")


def _probes(runs: list[Run]) -> list[str]:
    rows = [(r, res) for r in runs for res in r.results
            if _probe_of(res, "q") or _probe_of(res, "p")]
    if not rows:
        return ["## Probes", "", "No run given here was probed (`probe.kinds=[p,q]` adds "
                "the probe stage to a recipe's cells; `factlab probe CELL` probes a finished "
                "one — the ablations on these runs' models: `docs/probing.md`).", ""]
    lines = []
    prow = [(r, res) for r, res in rows if _probe_of(res, "p")]
    if prow:
        lines += ["## P-probe: every attribute at p1, the token before the bio's first value "
                  "(first-token tasks and birth month, held-out people, %; a task whose own "
                  "value follows p1 in most bios is left out of the p1 mean)", "",
                  "| run / cell | p1 mean (chance) | own position mean | probe | paper |",
                  "|---|---|---|---|---|"]
        for r, res in prow:
            p = _probe_of(res, "p")
            # tasks whose own value follows p1 for most people are left out (the first
            # attribute of a single bio): there p1 writes the value instead of recalling it
            ts = [t for t in p["tasks"] if t["target"] != "value" and t["test"][0] is not None
                  and (t.get("own_share") or [0])[0] <= 0.5]
            p1 = _stats([t["test"][0] for t in ts])[0]
            ch = _stats([t["chance"] for t in ts])[0]
            own = _stats([t.get("own") for t in ts])[0]
            note = PAPER_P_PROBE_NOTE.get(res["augment"], "–")
            lines.append(f"| {r.name} / {res['cell']} | {p1:.1f} ({ch:.1f}) | "
                         f"{'–' if own is None else f'{own:.1f}'} | {_probe_how(p)} | {note} |")
        lines.append("")
    qrow = [(r, res) for r, res in rows if _probe_of(res, "q")]
    if qrow:
        attrs = list(next(iter(PAPER_Q_PROBE.values())))
        lines += ["## Q-probe (whole value, held-out people, %; chance in brackets)", "",
                  "| run / cell | " + " | ".join(attrs) + " | OOD QA | probe |",
                  "|---" * (len(attrs) + 3) + "|"]
        for r, res in qrow:
            q = _probe_of(res, "q")
            got = {t["attribute"]: t for t in q["tasks"] if t["target"] == "value"}
            pap = PAPER_Q_PROBE.get(res["augment"], {})
            lines.append(f"| {r.name} / {res['cell']} | " + " | ".join(
                (f"{_pct(got[a]['test'][0])} ({_pct(got[a]['chance'])})" if a in got else "–")
                + (f", paper {pap[a]:.1f}" if a in pap else "") for a in attrs)
                + f" | {_pct(res['ood']['exact_match'])} | {_probe_how(q)} |")
        lines += ["", _result5([(_q_mean(_probe_of(res, "q")), res["ood"]["exact_match"])
                               for _, res in qrow]), ""]
    return lines


def _q_mean(q: dict) -> float | None:
    """A Q-probe's mean test accuracy over its whole-value tasks."""
    return _stats([t["test"][0] for t in q["tasks"] if t["target"] == "value"
                   and t["test"][0] is not None])[0]


def _result5(pairs: list[tuple[float | None, float]]) -> str:
    """The paper's Result 5 as a number: across the probed cells, the Pearson correlation
    of the Q-probe's mean whole-value accuracy with OOD QA accuracy."""
    pairs = [(q, o) for q, o in pairs if q is not None]
    head = ("Result 5 (the Q-probe tracks QA across pretraining data; the paper shows it "
            "across its datasets and gives no coefficient): ")
    if len(pairs) < 3:
        return head + f"{len(pairs)} probed cell(s) here, too few for a correlation."
    q, o = np.array(pairs, dtype=float).T
    if q.std() == 0 or o.std() == 0:
        return head + "no spread in one of the two over the probed cells."
    r = float(np.corrcoef(q, o)[0, 1])
    return head + (f"Pearson r = {r:.2f} between the Q-probe's mean whole-value accuracy "
                   f"and OOD QA accuracy over the {len(pairs)} probed cells (Q-probe "
                   f"{q.min():.1f}–{q.max():.1f}%, OOD {100 * o.min():.1f}–"
                   f"{100 * o.max():.1f}%).")


def _capacity(runs: list[Run]) -> list[str]:
    from factlab.experiments.capacity_report import capacity_table

    from factlab.experiments.stages import capacity_series, recount_exposures

    rows = []
    for r in runs:
        for res in r.results:
            if not res.get("capacity"):
                continue
            cap, cell = dict(res["capacity"]), r.cell(res["cell"])
            if cell is not None:
                # the keys from the run's recipe with this factlab's rule (results from
                # before a key, or from before seeds were left out of it)
                cap["series"] = capacity_series(cell)
                cap["people_series"] = capacity_series(cell, over="people")
                # the optimiser's rows a step and rate (results from before the stage
                # recorded them)
                cap.setdefault("batch_size", cell.pretrain.batch_size)
                cap.setdefault("lr", cell.pretrain.lr)
            if "bios_per_row" not in cap:
                # from before the stage counted the bios a row holds: recount from the
                # run's world, or say the count is one bio a row
                got = recount_exposures(cell, r.dir / res["cell"]) if cell else None
                if got:
                    cap["exposures"], cap["bios_per_row"] = got
                else:
                    cap["exposures_one_per_row"] = True
            rows.append(dict(res, cell=f"{r.dir.name} / {res['cell']}", capacity=cap))
    if not rows:
        return []
    return capacity_table(rows, "## Knowledge capacity (Part 3.3, `capacity`)") + [
        "The plot of bits against parameters: the run directory's `capacity.png`.", ""]


def _finetune_scale(cells) -> str:
    """steps x batch (mode) of the cells' QA finetune; – where none of them finetunes
    (mixed training, capacity)."""
    ft = [x for x in cells if "finetune" in x.stage_list()]
    if not ft:
        return "–"
    c = ft[0].finetune
    return f"{c.steps} × {c.batch_size} ({c.mode})"


def _scale(runs: list[Run]) -> list[str]:
    lines = ["## Scale of every run", "",
             "| run | recipe | cells | people | parameters | pretrain steps × batch | "
             "pretraining tokens | finetune steps × batch | context | "
             "wall time per cell (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        done = {res["cell"] for res in r.results}
        cells = [x for x in r.recipe.cells if x.name in done]  # those run
        if not cells:  # no result of any cell of the recipe
            lines.append(f"| `{r.dir.name}` | {r.recipe.name} | 0 | no finished cell of the "
                         f"recipe | | | | | | |")
            continue
        c = cells[0]
        steps = sorted({x.pretrain.steps for x in cells})
        secs = [res["seconds"] for res in r.results]
        # token slots of the pretraining (or mixed) stage: steps x rows x context, padding
        # and (mixed) the QA rows included, as the paper's 80,000 x 96 x 512 counts them
        toks = sorted({x.pretrain.steps * x.pretrain.batch_size * x.model.context
                       for x in cells})
        lines.append(f"| `{r.dir.name}` | {r.recipe.name} | {len(r.results)} | "
                     f"{', '.join(sorted({str(res['people']) for res in r.results}))} | "
                     f"{max(res['params'] for res in r.results):,} | "
                     f"{'/'.join(map(str, steps))} × {c.pretrain.batch_size} | "
                     f"{'/'.join(_short_count(t) for t in toks)} | "
                     f"{_finetune_scale(cells)} | "
                     f"{'/'.join(str(x) for x in sorted({x.model.context for x in cells}))} | "
                     f"{np.mean(secs) / 60:.1f} min |")
    paper_tokens = 80_000 * 96 * 512
    return lines + ["", f"The paper: GPT-2 small ({PAPER_PARAMS / 1e6:.0f}M parameters), "
                    f"{PAPER_BIOS_PEOPLE:,} people, 80,000 pretraining steps × 96 sequences of "
                    f"512 tokens ({_short_count(paper_tokens)} tokens).", ""]


def _short_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def reproduction_lines(runs: list[Run]) -> list[str]:
    names = {r.name for r in runs}
    lines = ["# Reproduction: Physics of LM Part 3.1 (with 3.2's inverse search and 3.3's capacity)", "",
             "Generated by `factlab reproduce` from the run directories below (or their "
             "records kept by `--keep`: each run's recipe.yaml and results.json); every number "
             "is measured (OOD: exact match of the whole answer on P_test people, %). "
             "*± x*: half the range over the runs given. What each gap comes from, measured: "
             "`docs/extraction.md`.", ""]
    fig3 = {n: PAPER_OOD_MEAN.get(n) for n in FIG3}
    if "fig3" in names:
        lines += _grid(runs, "fig3", FIG3, fig3, "Figure 3: the augmentation grid (`fig3`)")
        lines += _ordering(runs)
    if "quickstart" in names:
        lines += _grid(runs, "quickstart", ["single", "multi5+permute"], fig3,
                       "The quickstart's two cells")
    if "mixed" in names:
        cells = list(dict.fromkeys(res["cell"] for r in runs if r.name == "mixed"
                                   for res in r.results))

        def paper_of(_, c):  # the paper's mixed number is at QA_r = 0.8, bioS single
            if c.world.augment != "single":
                return None
            if c.regime != "mixed":
                return PAPER_OOD_MEAN["single"]
            return PAPER_OOD_MEAN["mixed:single"] if abs(c.qa_ratio - 0.8) < 1e-9 else None

        lines += _grid(runs, "mixed", cells, paper_of,
                       "Mixed training on bioS single (`mixed`; paper's mixed number is at "
                       "QA_r = 0.8)")
    if "celebrity" in names:
        lines += _grid(runs, "celebrity", ["minority-alone", "with-celebrities"],
                       {"minority-alone": PAPER_OOD_MEAN["single+permute1"],
                        "with-celebrities": PAPER_OOD_MEAN["celebrity"]},
                       "Celebrities help the minority (`celebrity`; OOD on minority people)")
    lines += _inverse(runs)
    lines += _probes(runs)
    lines += _capacity(runs)
    # the quickstart is no paper result of its own; a copy of a recipe counts (Run.name)
    missing = [n for n in SHIPPED if n != "quickstart" and n not in names]
    if missing:
        lines += ["Not run here: " + ", ".join(f"`{n}`" for n in missing) + ".", ""]
    lines += _scale(runs)
    return lines


RECORD_FILES = ("recipe.yaml", "results.json")


def keep_records(runs: list[Run], keep: str | Path) -> list[Run]:
    """Copy each run's ``recipe.yaml`` and ``results.json`` (a few KB: everything the table
    reads, no checkpoint) to ``keep/RUN``, so that the table can be regenerated, and runs
    of later sessions added to it, after the run directories are gone: a kept record is
    itself a run directory to ``load_run``. Returns the runs as read from their records."""
    keep = Path(keep)
    names = [r.dir.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FactlabError(f"reproduce --keep: two runs are named {', '.join(dup)}; "
                           "their records would overwrite each other (rename one directory)")
    kept = []
    for r in runs:
        dest = keep / r.dir.name
        if dest.resolve() != r.dir.resolve():
            dest.mkdir(parents=True, exist_ok=True)
            for f in RECORD_FILES:
                atomic_write_text(dest / f, (r.dir / f).read_text(encoding="utf-8"))
        kept.append(Run(dest, r.recipe, r.results))
    return kept


def write_reproduction(dirs, out: str | Path, keep: str | Path | None = None) -> Path:
    runs = [load_run(d) for d in dirs]  # every directory read (and checked) before a write
    if not runs:
        raise FactlabError("reproduce: give at least one run directory")
    if keep is not None:
        runs = keep_records(runs, keep)
    out = Path(out)
    atomic_write_text(out, "\n".join(reproduction_lines(runs)))
    return out
