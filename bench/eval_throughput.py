"""QA evaluation throughput: factlab's batched, length-sorted ``evaluate_qa`` against HF
``model.generate`` called one question at a time (greedy, same model, same
max_new_tokens), in the same run.

    python bench/eval_throughput.py                       # 2000 people, small gpt2-rope
    python bench/eval_throughput.py --n-factlab 600 --n-baseline 100 --train-steps 50

The model is a ``small`` gpt2-rope (random init, then ``--train-steps`` AdamW steps on the
P_train QA so that it answers in the QA format and stops at EOS like a real checkpoint);
the tokenizer is a byte-level BPE trained on the world's bios and QA. Both methods answer
the same P_test questions; the baseline answers the first ``--n-baseline`` of them, and
its predictions are compared with factlab's on those questions (they should agree).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from factlab.evaluate import evaluate_qa
from factlab.model import build_model
from factlab.text.qa import QA, completion, prompt, training_qa
from factlab.tokens import EOS, world_tokenizer
from factlab.corpus import CorpusConfig, make_corpus

def subset(qa: QA, n: int) -> QA:
    return QA(qa.person[:n], qa.attribute[:n], qa.template[:n], qa.question[:n],
              qa.answer[:n], qa.attributes, qa.heldout)


def train_briefly(model, tok, texts, steps: int, batch: int, device, seed: int) -> float:
    """A few AdamW steps on QA strings (full-sequence loss): enough to learn format + EOS."""
    if steps <= 0:
        return float("nan")
    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        pick = [texts[i] for i in g.integers(0, len(texts), size=batch)]
        enc = tok(pick, padding=True, return_tensors="pt").to(device)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def baseline(model, tok, questions: list[str], max_new_tokens: int) -> list[str]:
    """The plain way: one ``generate`` call per question (greedy, KV cache, no padding)."""
    out = []
    model.eval()
    with torch.inference_mode():
        for q in questions:
            ids = tok(prompt(q), return_tensors="pt").input_ids.to(model.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = gen[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            out.append(tok.decode(new, clean_up_tokenization_spaces=False))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=2000)
    ap.add_argument("--arch", default="gpt2-rope")
    ap.add_argument("--size", default="small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--n-factlab", type=int, default=3000)
    ap.add_argument("--n-baseline", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")

    t0 = time.perf_counter()
    world = make_corpus(CorpusConfig(people=args.people, seed=args.seed))
    train = training_qa(world)
    train_texts = [prompt(q) + completion(a) + EOS for q, a in zip(train.question, train.answer)]
    tok = world_tokenizer(world, args.vocab)
    model = build_model(args.arch, args.size, len(tok), 512, bos_id=tok.eos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=args.seed)
    model.to(device)
    loss = train_briefly(model, tok, train_texts, args.train_steps, 64, device, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"world {args.people} people, vocab {len(tok)}, {args.arch}/{args.size} "
          f"({n_params / 1e6:.2f}M params), {args.train_steps} train steps (loss {loss:.2f}); "
          f"setup {time.perf_counter() - t0:.1f}s")

    test = world.qa(world.test_ids)
    n_fl = min(args.n_factlab, len(test))
    n_bl = min(args.n_baseline, n_fl)
    qa = subset(test, n_fl)
    golds = [completion(a) for a in qa.answer]
    max_new = max(len(t) for t in tok(golds, add_special_tokens=False)["input_ids"]) + 4

    # warm-up (allocator, kernels) for both paths
    evaluate_qa(model, tok, subset(qa, 8), batch_size=8, max_new_tokens=max_new)
    baseline(model, tok, qa.question[:2], max_new)

    sync(device)
    t = time.perf_counter()
    metrics, recs = evaluate_qa(model, tok, qa, batch_size=args.batch_size,
                                num_beams=args.num_beams, max_new_tokens=max_new)
    sync(device)
    t_fl = time.perf_counter() - t

    t = time.perf_counter()
    base = baseline(model, tok, qa.question[:n_bl], max_new)
    sync(device)
    t_bl = time.perf_counter() - t

    agree = np.mean([b == r["prediction"] for b, r in zip(base, recs)])
    em_bl = np.mean([b == g for b, g in zip(base, golds)])
    em_fl_same = np.mean([r["correct"] for r in recs[:n_bl]])
    qps_fl, qps_bl = n_fl / t_fl, n_bl / t_bl
    beams = f", beams {args.num_beams}" if args.num_beams > 1 else ""
    print(f"\nP_test questions, greedy{beams}, max_new_tokens {max_new}")
    print(f"| method | questions | seconds | questions/s | exact match |")
    print(f"|---|---|---|---|---|")
    print(f"| HF generate, one at a time | {n_bl} | {t_bl:.2f} | {qps_bl:,.1f} | {em_bl:.3f} |")
    print(f"| factlab evaluate_qa (batch {args.batch_size}, sorted) | {n_fl} | {t_fl:.2f} | "
          f"{qps_fl:,.1f} | {metrics['exact_match']:.3f} |")
    print(f"\nspeed-up: {qps_fl / qps_bl:.1f}x; predictions identical on the {n_bl} shared "
          f"questions: {agree:.1%} (exact match there: factlab {em_fl_same:.3f}, "
          f"baseline {em_bl:.3f})")


if __name__ == "__main__":
    main()
