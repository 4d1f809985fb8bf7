#!/usr/bin/env bash
# Issue 4's accelerator measurement in one call (H100/H200): our naive, pcgrad and sago steps at the
# LLaMA-3.2-1B shape (bf16, forget and retain batches of 8x512), one process per kind so each peak
# memory is its own, then the PyTorch peer at the same shape when peer_step_torch.py sits in the
# repository root (copy it from shared/bench/ and name it in the device call's carry).
#   bash scripts/device_step_bench.sh                       # the 1b shape
#   SIZE=20m BATCH=2 SEQ=64 DTYPE=float32 ATTENTION=xla bash scripts/device_step_bench.sh   # a CPU smoke run
set -u
SIZE=${SIZE:-1b} BATCH=${BATCH:-8} SEQ=${SEQ:-512} DTYPE=${DTYPE:-bfloat16} ATTENTION=${ATTENTION:-cudnn}
STEPS=${STEPS:-10} PEER_SIZE=${PEER_SIZE:-$SIZE}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import jax; print('jax', jax.__version__, jax.devices())"
for kind in naive pcgrad sago; do
  python scripts/bench_step.py --size "$SIZE" --batch "$BATCH" --seq "$SEQ" --dtype "$DTYPE" \
    --attention "$ATTENTION" --scan --remat dots_with_no_batch_dims_saveable --logit-chunk 128 \
    --steps "$STEPS" --kinds "$kind" || echo "bench_step $kind failed with status $?"
done
if [ -f peer_step_torch.py ]; then
  python peer_step_torch.py --size "$PEER_SIZE" --batch "$BATCH" --seq "$SEQ" --dtype "$DTYPE" \
    --steps "$STEPS" || echo "peer failed with status $?"
else
  echo "peer_step_torch.py not in the work tree: peer not run"
fi
