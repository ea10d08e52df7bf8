#!/usr/bin/env bash
# The whole pipeline, end to end: environment, data, tokenizer, the diffusion model, the autoregressive (GPT)
# baseline at the same training compute, evaluation (the GPT judges the samples), samples, reports.
#
#   bash speedrun.sh            # 8xH100 (or NPROC GPUs): depth 12, 8000 steps of 524,288 tokens
#   bash speedrun.sh --cpu      # the same pipeline with tiny settings on local data, one CPU, a few minutes
#                               # (or SPEEDRUN_CPU=1 bash speedrun.sh)
#
# Everything goes to $RUN_DIR (default $NANOCHAT_BASE_DIR/speedrun, or .../speedrun_cpu with --cpu):
#   tokenizer/                               the BPE tokenizer trained here
#   checkpoints/diffusion_step_*.pt, report.md, diffusion_curves.png     the diffusion run (report by training)
#   checkpoints/gpt_step_*.pt, report_gpt.md, gpt_curves.png             the GPT baseline
#   eval_diffusion.json, eval_gpt.json       diffusion_eval of both checkpoints, samples judged by the GPT
#   samples.jsonl, samples_gpt.jsonl         diffusion_sample of both checkpoints
#   times.txt                                wall time of every stage
#
# Cost per stage on 8xH100 -- ESTIMATES, never measured (no GPU was available while this was written); they
# assume 30% MFU (the training log prints the real MFU every step: rescale by it) at ~$24/hour for the node:
#   install ~2 min | first 8 shards ~1 min | tokenizer (vocab 65536, 2B chars) ~2 min
#   the other 112 shards (~11 GB) download during the tokenizer stage; any rest is waited for (bandwidth-bound)
#   diffusion training (8000 steps x 524,288 tokens x 1.14e9 FLOPs/token = 4.8e18 FLOPs) ~35 min
#   GPT training (the same 4.8e18 FLOPs: 9,847 steps at 9.25e8 FLOPs/token) ~35 min
#   evaluation + samples on one GPU ~5-10 min
#   total ~1.5 hours, ~$35-40. Disk: ~47 GB of checkpoints (computed from the parameter counts: weights plus
#   every rank's optimizer state, at steps 4000 and 8000, and the GPT's last step).
# CPU mode (--cpu, defaults below): a few minutes on 2 CPU cores; stage times go to times.txt. Its data: DATA_DIR,
# else ../shared/data/tinyshakespeare/shards, else TinyShakespeare fetched once into
# $NANOCHAT_BASE_DIR/tinyshakespeare/shards (python -m nanochat.dataset --tinyshakespeare).
#
# Overrides (environment): NPROC, RUN_DIR, DATA_DIR, WANDB_RUN (default dummy = no wandb), SPEEDRUN_DEPTH,
# SPEEDRUN_ITERS (diffusion steps; the GPT's follow from equal FLOPs), SPEEDRUN_SEQ_LEN, SPEEDRUN_BATCH (per
# device), SPEEDRUN_TOTAL_BATCH, SPEEDRUN_VOCAB, SPEEDRUN_SHARDS, SPEEDRUN_EVAL_TOKENS, SPEEDRUN_BOUND_SAMPLES,
# SPEEDRUN_NUM_SAMPLES, SPEEDRUN_SAMPLE_STEPS, SPEEDRUN_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")"

CPU=${SPEEDRUN_CPU:-0}
for arg in "$@"; do
    case $arg in
        --cpu) CPU=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "speedrun.sh: unknown argument $arg (use --cpu, or none)" >&2; exit 2 ;;
    esac
done

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
WANDB_RUN=${WANDB_RUN:-dummy}

if [ "$CPU" = 1 ]; then
    RUN_DIR=${RUN_DIR:-$NANOCHAT_BASE_DIR/speedrun_cpu}
    VOCAB=${SPEEDRUN_VOCAB:-8192}
    DEPTH=${SPEEDRUN_DEPTH:-2}
    ITERS=${SPEEDRUN_ITERS:-200}
    SEQ_LEN=${SPEEDRUN_SEQ_LEN:-128}
    BATCH=${SPEEDRUN_BATCH:-8}
    TOTAL_BATCH=${SPEEDRUN_TOTAL_BATCH:--1}
    EVAL_TOKENS=${SPEEDRUN_EVAL_TOKENS:-4096}
    BOUND_SAMPLES=${SPEEDRUN_BOUND_SAMPLES:-8}
    NUM_SAMPLES=${SPEEDRUN_NUM_SAMPLES:-8}
    SAMPLE_STEPS=${SPEEDRUN_SAMPLE_STEPS:-64}
    DEVICE=(--device_type cpu)
    TOK_FLAGS=(--tiktoken "")  # offline: no tiktoken encodings to compare with
    if [ -n "${DATA_DIR:-}" ]; then
        if [ ! -d "$DATA_DIR" ]; then
            echo "speedrun.sh --cpu: no data at DATA_DIR=$DATA_DIR; set DATA_DIR to a folder of parquet shards, or" \
                 "unset it to use ../shared/data/tinyshakespeare/shards (or else fetch TinyShakespeare)" >&2
            exit 1
        fi
    elif [ -d ../shared/data/tinyshakespeare/shards ]; then
        DATA_DIR=../shared/data/tinyshakespeare/shards
    else
        DATA_DIR=$NANOCHAT_BASE_DIR/tinyshakespeare/shards
        [ -d "$DATA_DIR" ] || python -m nanochat.dataset --tinyshakespeare --out "$(dirname "$DATA_DIR")"
    fi
else
    RUN_DIR=${RUN_DIR:-$NANOCHAT_BASE_DIR/speedrun}
    NPROC=${NPROC:-8}
    VOCAB=${SPEEDRUN_VOCAB:-65536}
    DEPTH=${SPEEDRUN_DEPTH:-12}
    ITERS=${SPEEDRUN_ITERS:-8000}
    SEQ_LEN=${SPEEDRUN_SEQ_LEN:-1024}
    BATCH=${SPEEDRUN_BATCH:-16}
    TOTAL_BATCH=${SPEEDRUN_TOTAL_BATCH:-524288}
    EVAL_TOKENS=${SPEEDRUN_EVAL_TOKENS:-1048576}
    BOUND_SAMPLES=${SPEEDRUN_BOUND_SAMPLES:-32}
    NUM_SAMPLES=${SPEEDRUN_NUM_SAMPLES:-32}
    SAMPLE_STEPS=${SPEEDRUN_SAMPLE_STEPS:-256}
    DEVICE=()
    TOK_FLAGS=()
fi
TOK_DIR=$RUN_DIR/tokenizer
CKPT_DIR=$RUN_DIR/checkpoints
mkdir -p "$RUN_DIR"
: > "$RUN_DIR/times.txt"
START=$SECONDS
STAGE_START=$SECONDS
stage() {  # stage NAME: close the previous stage's timer, announce the next
    if [ -n "${STAGE:-}" ]; then
        printf '%-34s %6d s\n' "$STAGE" $((SECONDS - STAGE_START)) | tee -a "$RUN_DIR/times.txt"
    fi
    STAGE=$1
    STAGE_START=$SECONDS
    [ "$1" = done ] || echo -e "\n=== speedrun: $1 ($(date +%H:%M:%S))"
}

# -----------------------------------------------------------------------------
# environment and data
if [ "$CPU" = 1 ]; then
    echo "speedrun --cpu: run folder $RUN_DIR, data $DATA_DIR, depth $DEPTH, $ITERS diffusion steps"
    # installing is the quick start's job: pip install torch==2.13.0 -e ".[dev]" (the CPU build of torch)
else
    if [ "${SPEEDRUN_SKIP_INSTALL:-0}" != 1 ]; then
        stage "install"
        python -m pip install torch==2.13.0 -e .  # on Linux x86-64 this torch wheel is the CUDA build
    fi
    DATA_DIR=${DATA_DIR:-$NANOCHAT_BASE_DIR/base_data}
    # ~250M characters per shard, ~4.8 characters per token: the GPT reads ~5.2B tokens = ~100 shards
    stage "download 8 shards"
    python -m nanochat.dataset -n 8 --data_dir "$DATA_DIR"
    python -m nanochat.dataset -n "${SPEEDRUN_SHARDS:-120}" --data_dir "$DATA_DIR" > "$RUN_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
fi

# -----------------------------------------------------------------------------
# tokenizer: trained on the train split (only the first 8 shards are there yet on GPU), saved in the run folder
stage "tokenizer (vocab $VOCAB)"
python -m scripts.tok_train --vocab_size "$VOCAB" --data_dir "$DATA_DIR" --tokenizer_dir "$TOK_DIR"
python -m scripts.tok_eval --tokenizer_dir "$TOK_DIR" --data_dir "$DATA_DIR" "${TOK_FLAGS[@]}"

if [ -n "${DOWNLOAD_PID:-}" ]; then
    stage "wait for the data download"
    wait "$DOWNLOAD_PID" || { echo "the shard download failed: see $RUN_DIR/download.log" >&2; exit 1; }
fi

# -----------------------------------------------------------------------------
# the two models, same shape, batch, data and seed (--overwrite: a rerun of the pipeline trains afresh in $RUN_DIR)
COMMON=(--depth "$DEPTH" --max_seq_len "$SEQ_LEN" --device_batch_size "$BATCH" --total_batch_size "$TOTAL_BATCH"
        --data_dir "$DATA_DIR" --tokenizer_dir "$TOK_DIR" --checkpoint_dir "$CKPT_DIR" --overwrite --eval_tokens "$EVAL_TOKENS"
        "${DEVICE[@]}")
if [ "$CPU" = 1 ]; then
    EVERY=(--eval_every $(( (ITERS + 3) / 4 )) --sample_every -1 --save_every -1)
else
    EVERY=(--eval_every 500 --sample_every 1000 --save_every 4000)
fi

train() {  # diffusion_train, under torchrun on GPUs ("--": torchrun would take --run for its own --run-path)
    if [ "$CPU" = 1 ]; then
        python -m scripts.diffusion_train "$@"
    else
        torchrun --standalone --nproc_per_node="$NPROC" -m scripts.diffusion_train -- "$@"
    fi
}

stage "diffusion training ($ITERS steps)"
train --model diffusion "${COMMON[@]}" --num_iterations "$ITERS" \
    --bound_samples "$BOUND_SAMPLES" "${EVERY[@]}" --run "$WANDB_RUN"
DIFF_CKPT=$(printf '%s/diffusion_step_%06d.pt' "$CKPT_DIR" "$ITERS")

# equal training FLOPs: GPT steps = diffusion steps x (diffusion FLOPs/token) / (GPT FLOPs/token), same tokens/step
GPT_ITERS=$(python - "$DIFF_CKPT" "$ITERS" <<'EOF'
import sys
from nanochat.checkpoint import load_model
from nanochat.gpt import GPT, GPTConfig
diffusion, _, _ = load_model(sys.argv[1])
c = diffusion.config
gpt = GPT(GPTConfig(vocab_size=c.vocab_size, depth=c.depth, max_seq_len=c.max_seq_len))
print(max(1, round(int(sys.argv[2]) * diffusion.flops_per_token() / gpt.flops_per_token())))
EOF
)
GPT_RUN=$([ "$WANDB_RUN" = dummy ] && echo dummy || echo "${WANDB_RUN}_gpt")
stage "GPT training ($GPT_ITERS steps, equal FLOPs)"
train --model gpt "${COMMON[@]}" --num_iterations "$GPT_ITERS" "${EVERY[@]}" --run "$GPT_RUN"
GPT_CKPT=$(printf '%s/gpt_step_%06d.pt' "$CKPT_DIR" "$GPT_ITERS")

# -----------------------------------------------------------------------------
# evaluation (one device): bits per byte, throughput, samples judged by the GPT
EVAL=(--data_dir "$DATA_DIR" --eval_tokens "$EVAL_TOKENS" --num_samples "$NUM_SAMPLES"
      --batch_size "$BATCH" --judge "$GPT_CKPT" "${DEVICE[@]}")
if [ "$CPU" = 1 ]; then EVAL+=(--throughput_steps 3); fi
stage "evaluation"
python -m scripts.diffusion_eval --checkpoint "$DIFF_CKPT" "${EVAL[@]}" --sample_steps "$SAMPLE_STEPS" --output "$RUN_DIR/eval_diffusion.json"
python -m scripts.diffusion_eval --checkpoint "$GPT_CKPT" "${EVAL[@]}" --output "$RUN_DIR/eval_gpt.json"

stage "samples"
SAMPLE=(--num_samples 4 --seq_len "$SEQ_LEN" "${DEVICE[@]}")
python -m scripts.diffusion_sample --checkpoint "$DIFF_CKPT" "${SAMPLE[@]}" --num_steps "$SAMPLE_STEPS" --output "$RUN_DIR/samples.jsonl"
python -m scripts.diffusion_sample --checkpoint "$GPT_CKPT" "${SAMPLE[@]}" --output "$RUN_DIR/samples_gpt.jsonl"

stage done
printf '%-34s %6d s\n' "total" $((SECONDS - START)) | tee -a "$RUN_DIR/times.txt"
python - "$RUN_DIR" <<'EOF'
import json, sys
run = sys.argv[1]
for name in ("diffusion", "gpt"):
    r = json.load(open(f"{run}/eval_{name}.json"))
    q = r["sample_quality"]
    print(f"{name:9s} val bpb {r['val']['bpb']:.4f} ± {r['val']['bpb_stderr']:.4f} "
          f"({'upper bound' if name == 'diffusion' else 'exact'}) | samples: judge ppl {q['gen_ppl']:.1f}, "
          f"unigram entropy {q['unigram_entropy_nats']:.2f} nats")
EOF
echo "reports: $CKPT_DIR/report.md, $CKPT_DIR/report_gpt.md; evaluations: $RUN_DIR/eval_*.json; samples: $RUN_DIR/samples*.jsonl"
