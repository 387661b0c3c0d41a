"""World generation speed: factlab's vectorised renderer vs plain per-sentence Python.

    python bench/worldgen.py [--people 100000] [--augment multi5+permute]

Renders the bios of N people (default 100k, multi5+permute = 500k bios) and the six
questions of each, then renders the bios of a subset with the plain per-person,
per-sentence renderer (same templates, same random layout; its output is identical) and
prints bios/s of both and the ratio. Target: >= 200k bios/s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from factlab.text.documents import render_bios, render_bios_reference
from factlab.text.qa import qa_pairs
from factlab.corpus import CorpusConfig, make_corpus


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=100_000)
    ap.add_argument("--augment", default="multi5+permute")
    ap.add_argument("--baseline-people", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    world = make_corpus(CorpusConfig(people=args.people, augment=args.augment, unknown=0))
    t_sample = time.perf_counter() - t0
    t, ids, tpl = world.people, np.arange(args.people), world.templates

    t_fast, docs = best_of(lambda: render_bios(t, ids, tpl, args.augment,
                                               np.random.default_rng(0)), args.repeats)
    t_qa, qa = best_of(lambda: qa_pairs(t, ids, tpl), args.repeats)
    sub = ids[: args.baseline_people]
    t_ref, ref = best_of(lambda: render_bios_reference(t, sub, tpl, args.augment,
                                                       np.random.default_rng(0)), 1)
    check = render_bios(t, sub, tpl, args.augment, np.random.default_rng(0))
    assert check.text == ref.text, "fast and plain renderers disagree"

    fast_rate = len(docs) / t_fast
    ref_rate = len(ref) / t_ref
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"world: {args.people:,} people, {args.augment}, sampling took {t_sample:.2f}s")
    print(f"{'renderer':<34}{'items':>10}{'seconds':>10}{'items/s':>14}")
    print(f"{'factlab bios (vectorised)':<34}{len(docs):>10,}{t_fast:>10.3f}{fast_rate:>14,.0f}")
    print(f"{'plain Python bios (baseline)':<34}{len(ref):>10,}{t_ref:>10.3f}{ref_rate:>14,.0f}")
    print(f"{'factlab QA (6 questions)':<34}{len(qa):>10,}{t_qa:>10.3f}{len(qa) / t_qa:>14,.0f}")
    print(f"speed-up over the plain renderer: {fast_rate / ref_rate:.1f}x "
          f"(target >= 200,000 bios/s: {'met' if fast_rate >= 200_000 else 'NOT met'})")


if __name__ == "__main__":
    main()
