"""Product-key lookup vs scoring every slot, same queries, in the same run; and the step
time of a memory-augmented model vs its bare backbone.

    python bench/memory_lookup.py [--slots 65536,1048576] [--queries 4096] [--heads 4]
                                  [--topk 32] [--key-dim 64] [--width 128]
    python bench/memory_lookup.py --gate 10000,100000,1000000 [--queries 4096]
    python bench/memory_lookup.py --device cuda --backbone gpt2-small --step-slots 1048576 \
                                  --bank-layers 3,6,9 --batch 32 --seq 256   # on a GPU

``--gate N,...``: the key gate's nearest-key search instead, for N stored keys: the exact
codebook (``index=exact``, every key, torch) vs FAISS HNSW (``index=faiss-hnsw``; needs
faiss-cpu), queries/s of each, the ratio, the index's build time, and how often HNSW
returns the exact nearest key (queries near a stored key, as a stored question's state
is, and random ones).

For each bank size: queries/s of ``ProductKeyMemory.route`` (two half-key scorings of
sqrt(N) keys each, top-k of each, top-k of the k² sums) and of the exhaustive reference
(``brute_force_route``: all N slot scores, then top-k), the ratio, and whether the
selected slots agree on a sample. Then forward+backward time of a batch through a backbone
(``--backbone``; the quickstart's size by default) with and without a bank of
``--step-slots`` (overhead %, against the bare backbone trained whole and with only its head
trained), MFU on a GPU (bf16 autocast there, as the loop's ``precision=auto``), and the bytes
of the bank's weights and optimizer state (row-Adagrad on the values, Adam on the router).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch


def timed(fn, reps: int = 3) -> float:
    """Best of ``reps`` wall times after one warm-up (CUDA work waited for)."""
    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="65536,1048576")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--key-dim", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="small",
                    help="step time: gpt2-rope size (small, gpt2-small, gpt2-302m)")
    ap.add_argument("--step-slots", type=int, default=65536, help="step time: bank slots")
    ap.add_argument("--bank-layers", default="", help="step time: layers (default 1)")
    ap.add_argument("--batch", type=int, default=32, help="step time: sequences")
    ap.add_argument("--seq", type=int, default=56, help="step time: tokens per sequence")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ef", default="16,64,128", help="--gate: HNSW efSearch values")
    ap.add_argument("--gate", default="", help="stored keys, comma-separated: bench the "
                    "key gate's search (exact vs FAISS HNSW) instead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.gate:
        return gate_search(a)
    from factlab.memory import ProductKeyMemory, bank_bytes

    print(f"{a.device}: {a.queries} queries, {a.heads} heads x top-{a.topk}, key dim {a.key_dim}, "
          f"width {a.width}, {a.threads} threads")
    print(f"{'slots':>10} {'product-key q/s':>16} {'exhaustive q/s':>15} {'ratio':>7} "
          f"{'same top-k':>11}")
    x = torch.randn(a.queries, a.width, device=a.device)
    for n_slots in (int(s) for s in a.slots.split(",")):
        n = int(round(n_slots ** 0.5))
        bank = ProductKeyMemory(a.width, a.width, n_keys=n, heads=a.heads, topk=a.topk,
                                key_dim=a.key_dim).to(a.device)
        with torch.no_grad():
            pk = timed(lambda: bank.route(x))
            # the exhaustive scores are queries x heads x N floats: go in chunks
            chunk = max(1, (256 << 20) // (4 * a.heads * n * n))
            ex = timed(lambda: [bank.brute_force_route(x[i:i + chunk])
                                for i in range(0, len(x), chunk)], reps=1)
            sample = x[:64]
            same = torch.equal(torch.sort(bank.route(sample)[1], -1).values,
                               torch.sort(bank.brute_force_route(sample)[1], -1).values)
        print(f"{n * n:>10,} {a.queries / pk:>16,.0f} {a.queries / ex:>15,.0f} "
              f"{ex / pk:>6.1f}x {str(same):>11}")
        b = bank_bytes(n * n, a.width, heads=a.heads, key_dim=a.key_dim, n_keys=n)
        print(f"{'':>10} bytes: values {b['values'] / 2**20:,.0f} MiB, router "
              f"{b['router'] / 2**20:,.1f} MiB, optimizer state "
              f"{b['optimizer_state'] / 2**20:,.1f} MiB (row-Adagrad; dense Adam on the values "
              f"would be {2 * b['values'] / 2**20:,.0f} MiB)")

    step_time(a)


def step_time(a) -> None:
    """Forward+backward of one batch through a backbone with and without a bank.

    The bare backbone is timed twice: with only its output head trainable (the cheapest
    step: backward stops at the head) and with every weight trainable (full finetuning).
    The memory model's step trains the bank (and the head) over a frozen backbone, so its
    backward runs through the layers above the bank.
    """
    from factlab.memory import MemoryModel
    from factlab.model.build import build_model, flops_per_token

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    n = int(round(a.step_slots ** 0.5))
    bb = build_model("gpt2-rope", a.backbone, a.vocab, max(a.seq, 128), bos_id=0, eos_id=0,
                     pad_id=1, seed=0).to(dev)
    bb.requires_grad_(False)
    ids = torch.randint(2, a.vocab, (a.batch, a.seq), device=dev)
    layers = [int(x) for x in a.bank_layers.split(",")] if a.bank_layers else [1]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(model, params):  # timed() waits for the GPU
        with ctx:
            out = model(input_ids=ids).logits
        loss = out.float().logsumexp(-1).mean()
        return torch.autograd.grad(loss, params)

    head = bb.get_output_embeddings().weight
    n_params = sum(p.numel() for p in bb.parameters())
    fpt = flops_per_token(bb, a.seq)
    tokens = a.batch * a.seq
    peak = None
    if cuda:
        from factlab.train.loop import peak_flops
        peak = peak_flops(dev)
    print(f"\nstep time on {torch.cuda.get_device_name(dev) if cuda else 'cpu'} "
          f"({'bf16 autocast' if cuda else 'fp32'}): backbone gpt2-rope/{a.backbone}, "
          f"{n_params:,} params, batch {a.batch} x {a.seq} tokens")
    t_full = timed(lambda: step(bb.requires_grad_(True), list(bb.parameters())))
    bb.requires_grad_(False)
    t_bare = timed(lambda: step(bb, [head.requires_grad_(True)]))
    mem = MemoryModel(bb, layers=layers, n_keys=n, heads=a.heads, topk=a.topk,
                      key_dim=a.key_dim).to(dev)
    with torch.no_grad():
        for b in mem.banks:
            b.values.weight.normal_(0, 0.01)
    t_mem = timed(lambda: step(mem, [head.requires_grad_(True)] + list(mem.parameters())))

    def mfu(t):
        return f", MFU {tokens * fpt / t / peak:.1%} (6N+attention FLOPs)" if peak else ""

    print(f"  bare backbone, every weight trained (full finetuning): {1000 * t_full:.1f} ms, "
          f"{tokens / t_full:,.0f} tokens/s{mfu(t_full)}")
    print(f"  bare backbone, head only (backward stops at the head): {1000 * t_bare:.1f} ms")
    print(f"  frozen backbone + {n * n:,}-slot bank on layer(s) {layers}: {1000 * t_mem:.1f} ms,"
          f" {tokens / t_mem:,.0f} tokens/s; overhead vs full finetuning "
          f"{100 * (t_mem / t_full - 1):+.0f}%, vs head-only {100 * (t_mem / t_bare - 1):+.0f}%")
    if cuda:
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    if a.backbone != "small" or a.step_slots != 65536 or cuda:
        head.requires_grad_(False)  # the gated step below is the CPU default's alone
        return

    # the default of `factlab memory tune`: key gate + a bank at the head's input, reading
    # [state, whitened question state]; each row's first 20 tokens are its stored question,
    # so the bank acts on the 36 answer positions after it (as on a random-fact batch)
    class Questions:
        answer_start = np.full(len(ids), 20)

        def __len__(self):
            return len(ids)

        def example(self, q):
            return ids[q].numpy()

    gated = MemoryModel(bb, gate="keys", n_keys=256, heads=a.heads, topk=a.topk,
                        key_dim=a.key_dim)
    gated.write_keys(Questions())
    head.requires_grad_(True)  # wrapping froze the backbone again
    with torch.no_grad():
        gated.banks[0].values.weight.normal_(0, 0.01)
    t_gated = timed(lambda: step(gated, [head] + list(gated.parameters())))
    print(f"step, key gate + 65,536-slot bank at the head's input (36 of 56 positions open): "
          f"{1000 * t_gated:.0f} ms, overhead {100 * (t_gated / t_bare - 1):.0f}%")
    head.requires_grad_(False)


def gate_search(a) -> None:
    import faiss

    from factlab.memory.gate import KeyGate

    faiss.omp_set_num_threads(a.threads)
    print(f"key gate search, width {a.width}, {a.queries} queries, {a.threads} threads")
    print(f"{'keys':>10} {'efSearch':>8} {'exact q/s':>10} {'HNSW q/s':>10} {'ratio':>7} "
          f"{'HNSW build':>11} {'same key (near)':>16} {'same key (random)':>18}")
    g = torch.Generator().manual_seed(0)
    for n in (int(s) for s in a.gate.split(",")):
        keys = torch.randn(n, a.width, generator=g)
        exact, hnsw = KeyGate(a.width, index="exact"), KeyGate(a.width, index="faiss-hnsw")
        exact.add(keys)
        hnsw.add(keys)
        pick = torch.randint(0, n, (a.queries,), generator=g)
        near = keys[pick] + 0.3 * torch.randn(a.queries, a.width, generator=g)
        rand = torch.randn(a.queries, a.width, generator=g)
        t0 = time.perf_counter()
        hnsw.match(near[:1])  # builds the index
        build = time.perf_counter() - t0
        t_ex = timed(lambda: exact.match(near), reps=1)
        for ef in (int(e) for e in a.ef.split(",")):
            hnsw.ef_search = ef
            t_hn = timed(lambda: hnsw.match(near))
            same = [float((hnsw.match(q, index=True)[1] == exact.match(q, index=True)[1])
                          .float().mean()) for q in (near, rand)]
            print(f"{n:>10,} {ef:>8} {a.queries / t_ex:>10,.0f} {a.queries / t_hn:>10,.0f} "
                  f"{t_ex / t_hn:>6.1f}x {build:>10.1f}s {100 * same[0]:>15.1f}% "
                  f"{100 * same[1]:>17.1f}%")


if __name__ == "__main__":
    main()
