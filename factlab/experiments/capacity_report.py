"""The capacity stage's report section (Part 3.3): bits of knowledge stored per cell, and
a plot of bits against parameters with the paper's 2 and 1 bit/parameter lines."""

from __future__ import annotations

from pathlib import Path

# more exposures that raise a model's bits by less than this (relative) mean its capacity
# is reached (the paper's "saturation"); above it the point is below capacity
SATURATED_GAIN = 0.05
# the paper's bits per parameter at its two exposure levels (Part 3.3, GPT-2, bioS(N))
PAPER_BITS_PER_PARAM = {100: 1.0, 1000: 2.0}


def saturation(rows: list[dict]) -> dict[str, str]:
    """For each capacity cell (``{"cell", "capacity": {...}}``): ``saturated`` when a run of
    its series (the same training but for its length: ``capacity["series"]``, from
    ``stages.capacity_series``) with fewer exposures stored within SATURATED_GAIN of its
    bits (or one with more exposures stored no more), ``world-limited`` when it stores
    > 90% of its world, ``below capacity`` when a run with more exposures stores more by
    over SATURATED_GAIN, ``still rising`` for the most exposed run of a group whose bits
    still rose, ``nothing stored`` (< 1 bit, and no run with more exposures stored any),
    ``unknown`` with no run at another exposure count."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        k = r["capacity"]
        # one series: the same training but its length (results before the series key:
        # the same parameter count and people)
        by.setdefault((k["params"], k["people"], k.get("series")), []).append(r)
    out = {}
    for group in by.values():
        group.sort(key=lambda r: r["capacity"]["exposures"])
        for r in group:
            k = r["capacity"]
            if k["fraction"] is not None and k["fraction"] > 0.9:
                out[r["cell"]] = "world-limited"
                continue
            e = k["exposures"]  # a rerun at the same exposures is no evidence either way
            later = [g["capacity"]["bits"] for g in group if g["capacity"]["exposures"] > e]
            before = [g for g in group if g["capacity"]["exposures"] < e]
            if k["bits"] < 1 and not any(b >= 1 for b in later):
                # nothing stored, and no more exposures stored anything: not a capacity
                out[r["cell"]] = "nothing stored"
                continue
            prev = before[-1]["capacity"]["bits"] if before else None
            if later and max(later) > k["bits"] * (1 + SATURATED_GAIN):
                out[r["cell"]] = "below capacity"
            elif prev is not None and k["bits"] <= prev * (1 + SATURATED_GAIN):
                out[r["cell"]] = "saturated"
            elif later:  # more exposures did not raise it: this point is at capacity
                out[r["cell"]] = "saturated"
            elif prev is not None:  # the most exposures, still above the run before
                out[r["cell"]] = "still rising"
            else:
                out[r["cell"]] = "unknown"
    return out


def paper_line(exposures: float) -> str:
    """The paper's bits/parameter at the nearest of its exposure levels (log scale)."""
    import math

    near = min(PAPER_BITS_PER_PARAM, key=lambda e: abs(math.log(e) - math.log(max(exposures, 1))))
    return f"≈ {PAPER_BITS_PER_PARAM[near]:g} ({near:,} exposures)"


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
             "value, in bits), each value teacher-forced in the person's first bio; D: the "
             "number of values the attribute is drawn from uniformly (1 for the company city, "
             "which follows the employer). *entropy*: the bits a model certain of every value "
             "would store. Paper: ≈ 2 bits/parameter at 1,000 exposures, ≈ 1 at 100, once the "
             "world holds more bits than the model can store.", "",
             "| cell | people | parameters (non-embedding) | exposures | bits stored | "
             "entropy | stored / entropy | **bits/parameter** | paper | state |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    state = saturation(rows)
    for r in rows:
        k = r["capacity"]
        lines.append(f"| {r['cell']} | {k['people']:,} | {k['params']:,} "
                     f"({k['non_embedding_params']:,}) | {k['exposures']:.0f} | "
                     f"{k['bits']:,.0f} | {k['entropy_bits']:,.0f} | {100 * k['fraction']:.1f}% "
                     f"| **{k['bits_per_param']:.3f}** | {paper_line(k['exposures'])} | "
                     f"{state[r['cell']]} |")
    lines += ["", "*state*, from the runs of the same series (the same world, model and "
              "optimiser settings; only the steps differ): **saturated** — a run at another "
              f"exposure count stored within {100 * SATURATED_GAIN:.0f}% of these bits, so "
              "this is its capacity; **below capacity** — more exposures stored more; **still rising** "
              "— the most exposures run, and still above the run before; "
              "**world-limited** — over 90% of the world stored, a lower bound; **nothing stored** "
              "— under 1 bit, and more exposures stored none either; **unknown** "
              "— no run of it at another exposure count.", ""]
    return lines


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
