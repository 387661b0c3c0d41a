"""The capacity stage's report section (Part 3.3): bits of knowledge stored per cell, and
a plot of bits against parameters with the paper's 2 and 1 bit/parameter lines."""

from __future__ import annotations

from pathlib import Path


def capacity_section(out: Path, results: list[dict], cells: dict) -> list[str]:
    rows = [r for r in results if r.get("capacity")]
    if not rows:
        return []
    lines = ["## Knowledge capacity (Part 3.3)", "",
             "Bits stored = Σ over people and attributes of log2 D − (the model's loss on the "
             "value, in bits), each value teacher-forced in the person's first bio; D: the "
             "number of values the attribute is drawn from uniformly (1 for the company city, "
             "which follows the employer). *entropy*: the bits a model certain of every value "
             "would store. Paper: ≈ 2 bits/parameter at 1,000 exposures, ≈ 1 at 100, once the "
             "world holds more bits than the model can store.", "",
             "| cell | people | parameters (non-embedding) | exposures | bits stored | "
             "entropy | stored / entropy | **bits/parameter** | limited by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["capacity"]
        # a model that stores (nearly) all of its world is limited by the world, not by
        # its size: its bits/parameter is a lower bound on its capacity
        world_limited = k["fraction"] is not None and k["fraction"] > 0.9
        lines.append(f"| {r['cell']} | {k['people']:,} | {k['params']:,} "
                     f"({k['non_embedding_params']:,}) | {k['exposures']:.0f} | "
                     f"{k['bits']:,.0f} | {k['entropy_bits']:,.0f} | {100 * k['fraction']:.1f}% "
                     f"| **{k['bits_per_param']:.3f}** | "
                     f"{'the world (> 90% of it stored): a lower bound' if world_limited else 'the model or its training'} |")
    lines += ["", "A point measures capacity only when the model has stored less than its "
              "world holds and more exposures no longer raise it (saturation); run the same "
              "cell at more exposures to see which.", ""]
    png = _plot(out, rows)
    return lines + [f"![capacity]({png.name})", ""]


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
