"""Training throughput: factlab's loop vs HF ``Trainer`` on the same model, data, batch
and precision, in the same run.

    python bench/train_throughput.py [--size small] [--steps 150] [--batch 8] [--context 128]
                                     [--regime pretrain,named,whole,qa] [--rounds 3]

Both train a freshly initialised model (same seed) for the same number of steps on the
same sequences; wall time of the whole training call is measured (first 10 steps excluded
as warm-up for both, by timing two runs of different length). The two loops take turns,
``--rounds`` times (order alternating), and the median of the per-round ratios is
reported, so a machine whose speed drifts (shared CPUs) does not favour whichever loop ran
in its faster minutes. Regimes:

- ``pretrain``: BIO pretraining on bioS multi5+permute bios joined with EOS and packed
  (every position is a target; the paper's packing);
- ``named``: the same with the leading fragment of a split bio out of the loss (the
  quickstart's second phase);
- ``whole``: one whole bio per sequence, the rest padding out of the loss (the
  quickstart's first phase; factlab trims the padding, Trainer computes it);
- ``qa``: QA finetuning on P_train questions packed whole, loss on answer tokens only
  (labels -100 elsewhere, as both loops get them).

Tokens/s counts every position of every sequence for both loops. Prints tokens/s and the
ratio per regime; on a GPU also MFU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data(people: int, context: int, vocab: int, regime: str = "pretrain"):
    from factlab.text.qa import training_qa
    from factlab.tokens.encode import encode_docs, encode_qa
    from factlab.tokens.streams import DocStream, QAStream
    from factlab.tokens.tokenizer import world_tokenizer
    from factlab.corpus import CorpusConfig, make_corpus

    world = make_corpus(CorpusConfig(people=people, augment="multi5+permute", unknown=0))
    tok = world_tokenizer(world, vocab)
    if regime == "qa":
        return tok, QAStream(encode_qa(tok, training_qa(world)), context, tok.pad_token_id,
                             seed=0)
    return tok, DocStream(encode_docs(tok, world.bios()), context, tok.eos_token_id, seed=0,
                          whole=regime == "whole", pad_id=tok.pad_token_id,
                          mask_head=regime == "named")


def run_factlab(model, stream, steps, batch, precision, out):
    from factlab.train import Loop, TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=10, log_every=10**9,
                      precision=precision)
    t0 = time.perf_counter()
    Loop(model, stream, cfg, out, progress=False).run()
    return time.perf_counter() - t0


def run_trainer(model, stream, steps, batch, precision, out):
    from transformers import Trainer, TrainingArguments

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return steps * batch

        def __getitem__(self, i):
            s = stream.sequences(i, 1)
            return {"input_ids": torch.from_numpy(s["input_ids"][0]),
                    "labels": torch.from_numpy(s["labels"][0])}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        weight_decay=0.1, adam_epsilon=1e-6, adam_beta2=0.98, warmup_steps=10,
        lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10**9, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16",
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=DS())
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def main():
    from factlab.model.build import build_model, flops_per_token
    from factlab.train.loop import _precision, peak_flops
    from factlab.train.config import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--arch", default="gpt2-rope")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--regime", default="pretrain,named,whole,qa",
                    help="comma-separated: pretrain (concat), named, whole, qa")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    precision = _precision(TrainConfig(precision=args.precision))
    regimes = [r.strip() for r in args.regime.split(",") if r.strip()]
    bad = [r for r in regimes if r not in ("pretrain", "named", "whole", "qa")]
    if bad:
        ap.error(f"unknown regime {bad[0]!r}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(dev)
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, "
          f"threads {torch.get_num_threads()}, precision {precision}")
    for regime in regimes:
        tok, stream = data(args.people, args.context, args.vocab, regime)

        def model():
            return build_model(args.arch, args.size, len(tok), args.context,
                               bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                               pad_id=tok.pad_token_id, seed=0)

        tmp = tempfile.mkdtemp()
        loops = (("factlab", run_factlab), ("HF Trainer", run_trainer))
        runs = {name: [] for name, _ in loops}
        short = 10
        for r in range(args.rounds):
            for name, fn in (loops if r % 2 == 0 else loops[::-1]):
                # steady-state time = (long run - short run): excludes set-up and warm-up;
                # a fresh directory each run (factlab would resume a finished one)
                t_short = fn(model(), stream, short, args.batch, precision,
                             f"{tmp}/{name}-{r}-s")
                t_long = fn(model(), stream, args.steps, args.batch, precision,
                            f"{tmp}/{name}-{r}-l")
                runs[name].append((args.steps - short) * args.batch * args.context
                                  / (t_long - t_short))
        shutil.rmtree(tmp, ignore_errors=True)
        res = {name: float(np.median(v)) for name, v in runs.items()}
        ratios = [a / b for a, b in zip(runs["factlab"], runs["HF Trainer"])]
        m = model()
        fpt = flops_per_token(m, args.context)
        print(f"\n[{regime}] model: {args.arch}/{args.size}, "
              f"{sum(p.numel() for p in m.parameters()):,} params, context {args.context}, "
              f"batch {args.batch}, {args.steps} steps")
        print(f"{'loop':<12}{'tokens/s':>12}" + (f"{'MFU':>8}" if peak else ""))
        for name, tps in res.items():
            print(f"{name:<12}{tps:>12,.0f}" + (f"{tps * fpt / peak:>8.1%}" if peak else "")
                  + "   rounds: " + ", ".join(f"{x:,.0f}" for x in runs[name]))
        print(f"[{regime}] ratio factlab / HF Trainer: {float(np.median(ratios)):.2f}x "
              f"(median of {len(ratios)} rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 1.2x)")


if __name__ == "__main__":
    main()
