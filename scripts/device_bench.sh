#!/usr/bin/env bash
# Issue 15's accelerator measurements in one call (H100/H200), at most DEADLINE seconds (default
# 520), most important first; a section that no longer fits its budget is skipped and says so.
#   1. the LLaMA-3.2-1B-shape step (bf16, forget + retain 8x512, AdamW): naive, pcgrad, sago, one
#      process each (each peak its own), with the combiner diagnostics on (the CLI's default);
#   2. the PyTorch peer at the same shape (peer_step_torch.py in the repository root);
#   3. the 8B-shape SAGO + NPO step with the precomputed reference and bf16 moments on one device
#      (compare with docs/benchmarks.md's plan_memory estimate);
#   4. the 1B SAGO step without remat (chunk_head; sequence_tasks is on without remat): the H100
#      compiler planned 16.84 GiB with cuDNN attention (docs/benchmarks.md, "Without remat");
#      jax-unlearn unlearn (30 steps) -> eval -> export on a random 1B Hugging Face folder;
#   5. cuDNN attention against XLA's: logits (bf16 tolerance) and speed;
#   6. the plain-JAX step (plain_jax_step.py in the repository root) at the 1B shape.
# The peer scripts come from shared/bench/: copy them into the work tree, list them in
# .git/info/exclude and name them in the device call's carry. Every line goes to stdout and, when
# $OUT is set, to $OUT/device_bench.log.
#   bash scripts/device_bench.sh
#   SIZE=20m BIG=20m PEER_SIZE=tiny PLAIN_SIZE=20m BATCH=2 SEQ=64 ATTENTION=xla E2E_SEQ=64 \
#       bash scripts/device_bench.sh      # a CPU smoke run
set -u
SIZE=${SIZE:-1b} BIG=${BIG:-8b} PEER_SIZE=${PEER_SIZE:-$SIZE} PLAIN_SIZE=${PLAIN_SIZE:-$SIZE}
BATCH=${BATCH:-8} SEQ=${SEQ:-512} ATTENTION=${ATTENTION:-cudnn} STEPS=${STEPS:-8} E2E_SEQ=${E2E_SEQ:-512}
DEADLINE=${DEADLINE:-520}
start=$(date +%s)
log=${OUT:+$OUT/device_bench.log}
say() { if [ -n "$log" ]; then echo "$*" | tee -a "$log"; else echo "$*"; fi; }

# section NAME BUDGET_S COMMAND...: runs COMMAND under `timeout BUDGET_S` if it still fits
section() {
  local name=$1 budget=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - start) ))
  if [ "$left" -lt "$budget" ]; then
    say "## $name: skipped ($left s left, budget $budget s)"
    return
  fi
  say "## $name (budget $budget s): $*"
  local t0; t0=$(date +%s)
  if [ -n "$log" ]; then timeout "$budget" "$@" 2>&1 | tee -a "$log"; else timeout "$budget" "$@" 2>&1; fi
  say "## $name: status ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
}

say "## device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
python -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | while read -r l; do say "$l"; done

step_args=(--size "$SIZE" --batch "$BATCH" --seq "$SEQ" --dtype bfloat16 --attention "$ATTENTION" --scan
           --remat dots_with_no_batch_dims_saveable --logit-chunk 128 --steps "$STEPS" --warmup 3)
for kind in sago naive pcgrad; do
  section "step $SIZE $kind" 100 python scripts/bench_step.py "${step_args[@]}" --kinds "$kind"
done
if [ -f peer_step_torch.py ]; then
  section "torch peer $PEER_SIZE" 100 python peer_step_torch.py --size "$PEER_SIZE" --batch "$BATCH" --seq "$SEQ" \
    --dtype bfloat16 --steps "$STEPS" --warmup 3 --kinds naive,where_sago,mask_sago
else
  say "## torch peer: peer_step_torch.py not in the work tree: not run"
fi
section "step $BIG sago npo precompute" 130 python scripts/bench_step.py --size "$BIG" --batch "$BATCH" --seq "$SEQ" \
  --dtype bfloat16 --moment-dtype bfloat16 --attention "$ATTENTION" --scan --remat full --logit-chunk 128 \
  --steps 4 --warmup 2 --kinds sago --objective npo --reference precompute
section "step $SIZE sago, no remat" 100 python scripts/bench_step.py --size "$SIZE" --batch "$BATCH" --seq "$SEQ" \
  --dtype bfloat16 --attention "$ATTENTION" --scan --logit-chunk 128 --chunk-head --steps "$STEPS" --warmup 3 \
  --kinds sago
section "unlearn/eval/export $SIZE" 150 python scripts/e2e_random_model.py --size "$SIZE" --steps 30 --batch "$BATCH" \
  --seq "$E2E_SEQ" --work "${TMPDIR:-/tmp}/jax_unlearn_e2e"
section "attention $SIZE" 60 python scripts/bench_attention.py --size "$SIZE" --batch "$BATCH" --seq "$SEQ" \
  --dtype bfloat16 --steps "$STEPS"
if [ -f plain_jax_step.py ]; then
  section "plain JAX $PLAIN_SIZE" 60 python plain_jax_step.py --size "$PLAIN_SIZE" --batch "$BATCH" --seq "$SEQ" \
    --dtype bfloat16 --steps "$STEPS" --warmup 3
else
  say "## plain JAX: plain_jax_step.py not in the work tree: not run"
fi
say "## total $(( $(date +%s) - start )) s"
