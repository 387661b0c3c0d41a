"""The capacity stage's report section (Part 3.3): bits of knowledge stored per cell, and
a plot of bits against parameters with the paper's 2 and 1 bit/parameter lines."""

from __future__ import annotations

from pathlib import Path

# more exposures that raise a model's bits by less than this (relative) mean its capacity
# is reached (the paper's "saturation"); above it the point is below capacity
SATURATED_GAIN = 0.05
# the paper's bits per parameter at its two exposure levels (Part 3.3, GPT-2, bioS(N))
PAPER_BITS_PER_PARAM = {100: 1.0, 1000: 2.0}


def _series(k: dict) -> tuple:
    """One series over exposures: the same training but its length and seeds (results
    from before the series key: the same parameter count and people)."""
    return k["params"], k["people"], k.get("series")


def _at(k: dict, axis: str, by_rows: bool) -> float:
    """Where a run sits on ``axis``. Over exposures, ``by_rows``: its rows trained (steps
    x batch), which are equal for runs that differ only in their seeds while their
    exposures are not (a world's draw changes the bios' lengths, so the bios a whole-packed
    row holds: 1.66-1.70 at context 192); within one series more rows are more exposures."""
    return k["rows"] if axis == "exposures" and by_rows else k[axis]


def _by_rows(group: list[dict]) -> bool:
    """Whether every run of a series records its rows (results of the earliest stage may
    not): then they are placed by rows, else by exposures."""
    return all(r["capacity"].get("rows") for r in group)


def _along(group: list[dict], axis: str) -> dict[str, str]:
    """Labels for one series' runs ordered by ``axis`` (``exposures`` or ``people``).
    Runs at one point of the axis (other seeds) are pooled: the point's bits are their
    mean, and every run of it gets the point's label. ``below`` when a point further along
    stored more by over SATURATED_GAIN, ``saturated`` when it stores within
    SATURATED_GAIN of the most that a point before it stored, or less (or one further
    along stored no more), ``rising`` for the furthest point when it is above every point
    before, ``unknown`` with no other point on the axis (a rerun at the same point is no
    evidence either way). Against the best point before, not the last: one low point
    (a single seed's scatter) does not make the next one "rising"."""
    runs: dict[float, list[dict]] = {}
    by_rows = _by_rows(group)
    for r in group:
        runs.setdefault(_at(r["capacity"], axis, by_rows), []).append(r)
    mean = {x: sum(r["capacity"]["bits"] for r in rs) / len(rs) for x, rs in runs.items()}
    out = {}
    for x, rs in runs.items():
        later = [b for y, b in mean.items() if y > x]
        before = [b for y, b in mean.items() if y < x]
        prev = max(before) if before else None
        if later and max(later) > mean[x] * (1 + SATURATED_GAIN):
            label = "below"
        elif prev is not None and mean[x] <= prev * (1 + SATURATED_GAIN):
            label = "saturated"
        elif later:  # further along stored no more: this point is at capacity
            label = "saturated"
        else:
            label = "rising" if prev is not None else "unknown"
        out.update({r["cell"]: label for r in rs})
    return out


def saturation(rows: list[dict]) -> dict[str, str]:
    """For each capacity cell (``{"cell", "capacity": {...}}``), whether it measured the
    model's capacity, from the runs beside it on two axes:

    - more exposures, among the runs of its series (the same training but for its length:
      ``capacity["series"]``, from ``stages.capacity_series``);
    - more people at the same exposures (the same rows per person: the bios a row holds
      differ by ~2% between worlds), among the runs of its series over world sizes
      (``capacity["people_series"]``, ``capacity_series(cell, over="people")``): the
      paper's capacity at a number of exposures is what a model stores once a larger world
      no longer raises it.

    ``world-limited`` when it stores > 90% of its world; ``nothing stored`` (< 1 bit, and
    no run with more exposures stored any); ``below capacity`` when a run with more
    exposures stored more by over SATURATED_GAIN, ``below capacity (more people stored
    more)`` when a run of a larger world at its exposures did; ``saturated`` when no run
    with fewer exposures stored less by over SATURATED_GAIN (or one with more stored no
    more); ``at capacity for its exposures`` when the same holds over people; ``still
    rising`` for the most exposed run of a series whose bits still rose (``still rising
    with people``: the largest world of its series over people); ``unknown``
    with no run at another exposure count or world size. Runs that differ only in their
    seeds are one point: compared by their mean."""
    by: dict[tuple, list[dict]] = {}
    wide: dict[tuple, list[dict]] = {}
    for r in rows:
        k = r["capacity"]
        by.setdefault(_series(k), []).append(r)
        if k.get("people_series"):  # rows per person equal to two significant figures
            per = k["rows"] / k["people"] if k.get("rows") else k["exposures"]
            wide.setdefault((k["people_series"], float(f"{per:.2g}")), []).append(r)
    exp, ppl = {}, {}
    for group in by.values():
        exp.update(_along(group, "exposures"))
    for group in wide.values():
        ppl.update(_along(group, "people"))
    out = {}
    for r in rows:
        k, name = r["capacity"], r["cell"]
        e, p = exp[name], ppl.get(name, "unknown")
        group = by[_series(k)]
        br = _by_rows(group)
        later = [g["capacity"]["bits"] for g in group
                 if _at(g["capacity"], "exposures", br) > _at(k, "exposures", br)]
        if k["fraction"] is not None and k["fraction"] > 0.9:
            out[name] = "world-limited"
        elif k["bits"] < 1 and not any(b >= 1 for b in later):
            # nothing stored, and no more exposures stored anything: not a capacity
            out[name] = "nothing stored"
        elif e == "below":
            out[name] = "below capacity"
        elif p == "below":
            out[name] = "below capacity (more people stored more)"
        elif e == "saturated":
            out[name] = "saturated"
        elif p == "saturated":
            out[name] = "at capacity for its exposures"
        elif e == "rising":
            out[name] = "still rising"
        else:
            out[name] = "still rising with people" if p == "rising" else "unknown"
    return out


def points(rows: list[dict]) -> list[list[dict]]:
    """The runs of each point: one series (the same training but its seeds) at one
    length (rows trained: its seeds' exposures differ a little), the pooling
    ``saturation`` judges on. Ordered by parameters, people and length; runs in the order
    given."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault(_series(r["capacity"]), []).append(r)
    by: dict[tuple, list[dict]] = {}
    for key, group in series.items():
        br = _by_rows(group)
        for r in group:
            by.setdefault((*key, _at(r["capacity"], "exposures", br)), []).append(r)
    return sorted(by.values(), key=lambda rs: (rs[0]["capacity"]["params"],
                                               rs[0]["capacity"]["people"],
                                               rs[0]["capacity"]["exposures"]))


def points_table(rows: list[dict]) -> list[str]:
    """Each point with its runs pooled (mean and half the range of the bits stored), when
    some point has more than one run: the numbers its state was judged on."""
    pts = points(rows)
    if all(len(rs) < 2 for rs in pts):
        return []
    state = saturation(rows)
    lines = ["Each point, its runs pooled (runs that differ only in their seeds; ± half the "
             "range):", "",
             "| point | runs | people | parameters | exposures | **bits stored** (mean) | "
             "each run | stored / entropy | bits/parameter | state | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rs in pts:
        k = rs[0]["capacity"]
        bits = [r["capacity"]["bits"] for r in rs]
        mean = sum(bits) / len(bits)
        exposures = sum(r["capacity"]["exposures"] for r in rs) / len(rs)
        spread = f" ± {(max(bits) - min(bits)) / 2:,.0f}" if len(bits) > 1 else ""
        states = dict.fromkeys(state[r["cell"]] for r in rs)
        lines.append(f"| {rs[0]['cell']} | {len(rs)} | {k['people']:,} | {k['params']:,} | "
                     f"{_exposures(exposures, [r['capacity'] for r in rs])} | "
                     f"**{mean:,.0f}**{_first_bio([r['capacity'] for r in rs])}{spread} | "
                     f"{', '.join(f'{b:,.0f}' for b in bits)} | "
                     f"{100 * mean / k['entropy_bits']:.1f}% | {mean / k['params']:.3f} | "
                     f"{'; '.join(states)} | {training(k)} |")
    return lines + [""]


def paper_line(exposures: float) -> str:
    """The paper's bits/parameter at its exposure level within a factor of 1.75 of these
    exposures; between its levels, both (the paper gives no number in between)."""
    import math

    near = min(PAPER_BITS_PER_PARAM, key=lambda e: abs(math.log(e) - math.log(max(exposures, 1))))
    if abs(math.log(near) - math.log(max(exposures, 1))) <= math.log(1.75):
        return f"≈ {PAPER_BITS_PER_PARAM[near]:g} ({near:,} exposures)"
    lo = [e for e in PAPER_BITS_PER_PARAM if e < exposures]
    hi = [e for e in PAPER_BITS_PER_PARAM if e > exposures]
    if lo and hi:
        a, b = max(lo), min(hi)
        return (f"between ≈ {PAPER_BITS_PER_PARAM[a]:g} ({a:,}) and "
                f"≈ {PAPER_BITS_PER_PARAM[b]:g} ({b:,} exposures)")
    return f"≈ {PAPER_BITS_PER_PARAM[near]:g} ({near:,} exposures; these are "  \
        f"{exposures / near:.1f}x)"


def capacity_section(out: Path, results: list[dict], cells: dict) -> list[str]:
    rows = [r for r in results if r.get("capacity")]
    if not rows:
        return []
    png = _plot(out, rows)
    return capacity_table(rows) + [f"![capacity]({png.name})", ""]


def capacity_table(rows: list[dict], title: str = "## Knowledge capacity (Part 3.3)"
                   ) -> list[str]:
    """The table of bits stored per cell (results carrying ``capacity``)."""
    lines = [title, "",
             "Bits stored = Σ over people and attributes of log2 D − (the model's loss on the "
             "value, in bits), each value teacher-forced in the person's first bio that does "
             "not give it away (no company city before the employer); D: the "
             "number of values the attribute is drawn from uniformly (1 for the company city, "
             "which follows the employer). *entropy*: the bits a model certain of every value "
             "would store. Paper: ≈ 2 bits/parameter at 1,000 exposures, ≈ 1 at 100, once the "
             "world holds more bits than the model can store.", "",
             "| cell | people | parameters (non-embedding) | exposures | bits stored | "
             "entropy | stored / entropy | **bits/parameter** | paper | state | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    state = saturation(rows)
    for r in rows:
        k = r["capacity"]
        lines.append(f"| {r['cell']} | {k['people']:,} | {k['params']:,} "
                     f"({k['non_embedding_params']:,}) | {_exposures(k['exposures'], [k])} | "
                     f"{k['bits']:,.0f}{_first_bio([k])} | {k['entropy_bits']:,.0f} | "
                     f"{100 * k['fraction']:.1f}% "
                     f"| **{k['bits_per_param']:.3f}** | {paper_line(k['exposures'])} | "
                     f"{state[r['cell']]} | {training(k)} |")
    g = f"{100 * SATURATED_GAIN:.0f}%"
    lines += ["", "*state*, from the runs beside it: its series over exposures (the same "
              "world, model and optimiser settings; only the steps differ) and over people "
              "(the same but for the world's size, at the same exposures). **saturated** — "
              f"no run with more exposures stored {g} more, and one with fewer already "
              f"stored within {g} of these bits (or one with more stored no more): this is "
              "its capacity; **at capacity for its exposures** — the same over world sizes "
              "at these exposures (the paper's capacity at a number of exposures); **below "
              f"capacity** — more exposures stored over {g} more (*more people stored more*: "
              "a larger world at the same exposures did); **still rising** — the most "
              f"exposures run, over {g} above every run before (*with people*: the largest "
              "world, above every smaller one); **world-limited** — over 90% of the world "
              "stored, a lower bound; **nothing stored** — under 1 bit, and more exposures "
              "stored none either; **unknown** — no run of it at another exposure count or "
              "world size. Runs at other seeds of one point are pooled: its state is "
              "judged on their mean. *training*: rows a step × peak learning rate of the "
              "BIO pretraining (at one exposure count, fewer rows a step are more "
              "updates: docs/capacity.md).", ""]
    if any(r["capacity"].get("exposures_one_per_row") for r in rows):
        lines += [f"{ONE_PER_ROW} exposures counted one bio per row: results from before "
                  "2026-12-07 whose worlds are not here to recount. Whole packing puts as "
                  "many whole bios in a row as fit (1.67 bios of ~92 tokens at context 192), "
                  "so these counts can be low by that factor.", ""]
    if any(not r["capacity"].get("clean_context") for r in rows):
        lines += [f"{FIRST_BIO} values scored in each person's first bio, where a permuted "
                  "bio states the company city before the employer about half the time and "
                  "the model reads most of the employer off it: these bits overstate what "
                  "it stores (results from before 2026-12-07's eighth session; the stage now "
                  "scores each value where nothing before it gives it away). Measured on a "
                  "width-64 model of an 8,000-person world: every one of its 24,184 employer "
                  "bits was the city's.", ""]
    return lines + points_table(rows)


ONE_PER_ROW = "†"
FIRST_BIO = "‡"


def _first_bio(ks: list[dict]) -> str:
    """The mark on bits scored in the first bio, the company city possibly before the
    employer (results without ``clean_context``)."""
    return FIRST_BIO if any(not k.get("clean_context") for k in ks) else ""


def training(k: dict) -> str:
    """The pretraining's rows a step and peak rate, as the tables print them (– for
    results that record neither)."""
    if not k.get("batch_size"):
        return "–"
    return f"{k['batch_size']} × {k['lr']:g}" if k.get("lr") else f"{k['batch_size']} rows"


def _exposures(mean: float, ks: list[dict]) -> str:
    """Exposures as the table prints them, marked where any run's were counted one bio a
    row (``exposures_one_per_row``: set by ``factlab reproduce`` for old results it could
    not recount)."""
    return f"{mean:.0f}" + (ONE_PER_ROW if any(k.get("exposures_one_per_row") for k in ks)
                            else "")


def _plot(out: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ps = [r["capacity"]["params"] for r in rows]
    for r in rows:
        k = r["capacity"]
        ax.scatter(k["params"], max(k["bits"], 1), s=24)
        ax.annotate(f"{r['cell']} ({k['exposures']:.0f}x)", (k["params"], max(k["bits"], 1)),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    x = np.geomspace(min(ps) / 2, max(ps) * 2, 20)
    ax.plot(x, 2 * x, "--", lw=1, label="2 bits/param (paper, 1000 exposures)")
    ax.plot(x, x, ":", lw=1, label="1 bit/param (paper, 100 exposures)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("bits of knowledge stored")
    ax.legend(fontsize=6)
    fig.tight_layout()
    p = out / "capacity.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
