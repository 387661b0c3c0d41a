#!/usr/bin/env bash
# The GPU checks of one short device lease (about 9 minutes on one H200), run from the
# repository root:  OUT=/tmp/gpu bash bench/gpu_checks.sh
#
#   1. bench/memory_lookup.py: product-key vs exhaustive top-k at 65,536 and 1,048,576
#      slots (width 768), and the step time of gpt2-small with and without a 1M-slot bank
#      (overhead, MFU);
#   2. fig3's single and multi5+permute cells at gpt2-small (2,000 people, the paper's value
#      pools, 3,000 pretraining steps): OOD accuracy, and tokens/s and MFU from the loop's
#      own metrics;
#   3. `factlab memory tune` of 2,000 random 32-character facts into a 1M-slot bank on the
#      multi5+permute model of step 2 (1 minute of tuning);
#   4. bench/train_throughput.py at gpt2-small: factlab's loop vs HF Trainer, MFU.
#
# Each step has its own time limit, so a slow one cannot take the rest with it; what ran
# lands in $OUT/log.txt, and the small files of steps 2-3 in $OUT/*.tgz. Where pydantic is
# missing (the device image has none), wheels in .whl/ are installed first (see
# /work/.library/device/README.md for how they were fetched: pydantic 2.14.4,
# pydantic_core 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, typing_extensions
# 4.16.0 for CPython 3.12). Prepared on 2026-12-04 and checked here on the CPU for its
# plumbing only: no GPU has run it yet. The time limits add up to ~9.5 minutes.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import pydantic" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
FL="python3 -m factlab.cli"
T0=$(date +%s)
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, logged
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - T0 ))s: $*" >>"$LOG"
    # its own session (a background job of this non-interactive shell is no group leader,
    # so setsid does not fork and the session's id is $!): killing that process group
    # ends the cells a timed-out run left behind, and nothing else on the machine
    setsid timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1 &
    local pid=$!
    wait "$pid"
    echo "=== $name: exit $? at +$(( $(date +%s) - T0 ))s" >>"$LOG"
    kill -- "-$pid" 2>/dev/null
    sleep 1
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate',
accelerate.__version__, 'cuda', torch.cuda.is_available())"
    free -g | head -2
} >>"$LOG" 2>&1

step lookup "${LOOKUP_S:-75}" python3 bench/memory_lookup.py --device cuda --slots 65536,1048576 \
    --queries 4096 --width 768 --backbone gpt2-small --step-slots 1048576 --bank-layers 6 \
    --batch 32 --seq 256

step fig3 "${FIG3_S:-300}" $FL run fig3 only=single,multi5+permute model.size=gpt2-small \
    model.context=256 model.threads=4 world.people=2000 world.pools=null \
    pretrain.steps=3000 pretrain.batch_size=32 pretrain.lr=0.0008 pretrain.warmup=150 \
    pretrain.log_every=250 pretrain.eval_every=0 finetune.steps=600 finetune.batch_size=32 \
    finetune.eval_every=0 --out /tmp/fig3gpu
tar czf "$OUT/fig3.tgz" --exclude=model --exclude=checkpoint --exclude=tokenizer \
    --exclude=world -C /tmp fig3gpu 2>>"$LOG"

if [ -d "/tmp/fig3gpu/multi5+permute/finetune" ]; then
    step memory1m "${MEM_S:-110}" $FL memory tune "/tmp/fig3gpu/multi5+permute" --random 2000 \
        --minutes 1.0 --set n_keys=1024 --out /tmp/mem1m --no-progress
    tar czf "$OUT/mem1m.tgz" --exclude=model --exclude=checkpoint -C /tmp mem1m 2>>"$LOG"
fi

step train "${TRAIN_S:-70}" python3 bench/train_throughput.py --size gpt2-small --context 512 \
    --batch 32 --steps 40 --regime pretrain --rounds 1
echo "=== done at +$(( $(date +%s) - T0 ))s" >>"$LOG"
