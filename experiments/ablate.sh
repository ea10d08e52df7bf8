#!/usr/bin/env bash
# Ablations on tinyshakespeare at a fixed number of steps (equal training steps and batch for every row).
# Usage: bash experiments/ablate.sh NAME [extra diffusion_train flags...]
# Prints one line "NAME | val bpb (bound) | flags". Every ablation row in dev/LOG.md is one such call.
# Environment: DATA (shards dir), TOK (tokenizer dir; the rows used vocab 4096 and 8192), OUT (checkpoints), STEPS (default 200).
set -euo pipefail
name=$1; shift
DATA=${DATA:-../shared/data/tinyshakespeare/shards}
TOK=${TOK:-$HOME/.cache/nanochat/tokenizer}
OUT=${OUT:-ablations}
STEPS=${STEPS:-200}
log="$OUT/$name.log"
mkdir -p "$OUT"
python -m scripts.diffusion_train --depth=4 --max_seq_len=128 --device_batch_size=8 --num_iterations="$STEPS" \
    --eval_every=-1 --eval_tokens=4096 --bound_samples=16 --sample_every=0 --save_every=-1 \
    --data_dir "$DATA" --tokenizer_dir "$TOK" --checkpoint_dir "$OUT/$name" "$@" > "$log" 2>&1
bpb=$(grep "val bpb" "$log" | tail -1 | sed -E 's/.*val bpb ([0-9.]+) ± ([0-9.]+).*/\1 ± \2/')
echo "$name | $bpb | $*"
