"""Probe training time: factlab's P-probe (all 11 tasks x 6 positions in one run on the
training loop) vs the naive way, one probe per (task, position) trained alone, in the same
run, on the same frozen model, data, batch and step count.

    python bench/probe_throughput.py [--size small] [--people 1000] [--steps 10] [--full]

The naive baseline is a plain PyTorch loop per probe: rank-r embedding update + LayerNorm +
linear classifier, AdamW, one backbone forward/backward per step for that probe alone. It
is given one advantage factlab does not take per pass: each probe's inputs are cut right
after its own read position. Without ``--full`` it trains one naive probe per position
(6, each on a different task) and multiplies by the 11 tasks (every probe of one position
costs the same: same batch, same tokens); ``--full`` trains all 66.

Prints seconds per step and the time to train every probe for ``--steps`` steps, for
factlab's ``per_task`` mode (one rank-r update per task, as the paper; 6 positions share a
pass, 11 task variants folded into one batched call), its ``shared`` mode (one pass serves
all 66 classifiers) and the naive loop, with the ratios. The weights of the backbone do not
change the cost, so a freshly initialised model of the chosen size is probed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup(people: int, size: int, context: int, vocab: int, seed: int = 0):
    from factlab.model import build_model
    from factlab.probe import ProbeConfig, prepare
    from factlab.tokens import world_tokenizer
    from factlab.corpus import CorpusConfig, make_corpus

    world = make_corpus(CorpusConfig(people=people, augment="multi5+permute", seed=seed))
    tok = world_tokenizer(world, vocab)
    model = build_model("gpt2-rope", size, len(tok), context, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed)
    data = prepare(world, tok, ProbeConfig(kind="p", seed=seed), context)
    return world, tok, model, data


def run_factlab(model, tok, world, data, steps: int, batch: int, embedding: str) -> float:
    """Seconds per optimizer step of factlab's probe (all tasks and positions at once)."""
    from factlab.probe import ProbeConfig, run_probe

    cfg = ProbeConfig(kind="p", steps=steps, batch_size=batch, precision="no",
                      embedding=embedding, log_every=10**6)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_probe(model, tok, world, cfg, d, data=data, progress=False)
        total = time.perf_counter() - t0
    # subtract the scoring of train and test people (not training) measured separately
    from factlab.probe.heads import ProbeModel
    from factlab.probe.run import evaluate_probe

    probe = ProbeModel(model, [t.n_classes for t in data.tasks], data.positions.shape[1],
                       rank=2, embedding=embedding)
    t0 = time.perf_counter()
    evaluate_probe(probe, data, data.test)
    evaluate_probe(probe, data, data.train)
    scoring = time.perf_counter() - t0
    assert res["probe"]["variants"] == {"per_task": len(data.tasks), "shared": 1}[embedding]
    return (total - scoring) / steps


def naive_probe(model, data, task: int, position: int, steps: int, batch: int,
                rank: int = 2, seed: int = 0) -> float:
    """Train ONE probe (task, position) alone; returns seconds per step."""
    g = torch.Generator().manual_seed(seed)
    E = model.get_input_embeddings().weight
    V, d = E.shape
    C = data.tasks[task].n_classes
    U = torch.zeros(V, rank, requires_grad=True)
    W = (torch.randn(rank, d, generator=g) * float(E.std())).requires_grad_()
    ln = torch.nn.LayerNorm(d)
    head = torch.nn.Linear(d, C)
    params = [U, W, *ln.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.3, eps=1e-6)
    rows = data.train
    pos_all, y_all = data.positions[:, position], data.targets[:, task]
    rows = rows[(pos_all[rows] >= 0) & (y_all[rows] >= 0)]
    rng = np.random.default_rng(seed)
    model.train()
    t0 = None
    for s in range(steps + 1):  # step 0 is warm-up, not timed
        if s == 1:
            t0 = time.perf_counter()
        r = rng.choice(rows, batch, replace=False)
        pos = torch.from_numpy(pos_all[r])
        ids = torch.from_numpy(data.input_ids[r, :int(pos.max()) + 1])  # cut after the read
        x = E[ids] + U[ids] @ W
        h = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = head(ln(h[torch.arange(len(r)), pos]))
        loss = F.cross_entropy(logits, torch.from_numpy(y_all[r]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--batch", type=int, default=50, help="people per step (paper: 50)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="train all 66 naive probes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, tok, model, data = setup(args.people, args.size, args.context, args.vocab)
    T, P = len(data.tasks), data.positions.shape[1]
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"P-probing {T} tasks x {P} positions, {len(data.train)} probe-train people, "
          f"model {args.size} ({n_params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads")

    # factlab: one run trains every probe; one warm-up step per run is included in its time
    per_task = run_factlab(model, tok, world, data, args.steps, args.batch, "per_task")
    shared = run_factlab(model, tok, world, data, args.steps, args.batch, "shared")

    pairs = ([(t, p) for t in range(T) for p in range(P)] if args.full
             else [((p * 2) % T, p) for p in range(P)])  # one task per position
    per_pos = {p: [] for p in range(P)}
    for t, p in pairs:
        per_pos[p].append(naive_probe(model, data, t, p, args.steps, args.batch))
    # every (task, position) probe costs what its position costs
    naive = sum(float(np.mean(v)) * T for v in per_pos.values())
    how = "all 66 trained" if args.full else f"{len(pairs)} trained, x {T} tasks"

    rows = [("factlab per_task (paper: a probe per task)", per_task),
            ("factlab shared (one embedding update)", shared),
            (f"naive: a probe per (task, position) ({how})", naive)]
    print(f"\n{'method':<58} {'s/step':>8} {'s for all 66 probes':>20} {'vs naive':>9}")
    for name, s in rows:
        print(f"{name:<58} {s:8.3f} {s * args.steps:20.1f} {naive / s:8.1f}x")
    print(f"\n(s/step of naive = the sum over the 66 probes of one step each; per position: "
          + ", ".join(f"p{p + 1} {np.mean(v):.3f}s" for p, v in per_pos.items()) + ")")


if __name__ == "__main__":
    main()
