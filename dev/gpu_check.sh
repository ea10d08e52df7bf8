#!/usr/bin/env bash
# The CUDA-only parts of the project, checked in a few minutes on a CUDA machine (no network needed):
#   1. the device, torch and the bf16 peak the MFU figures use
#   2. flash attention (SDPA) in use for the models' attention shapes in bf16
#   3. bf16 + torch.compile training steps of both models (scripts.diffusion_train on shards built from this repo's docs)
#   4. a two-GPU NCCL run when two GPUs are present (torchrun, 2 ranks)
#   5. scripts.bench at depth 12 (bf16, compiled next to eager): tokens/s, MFU against the bf16 peak, memory per device
#
#   bash dev/gpu_check.sh                 # everything goes to $OUT (default /tmp/gpu_check): logs and bench.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export NANOCHAT_BASE_DIR="$OUT/base" OMP_NUM_THREADS=8
START=$SECONDS
say() { echo -e "\n=== $1 ($((SECONDS - START)) s)"; }

say "1. device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'EOF'
import torch
from nanochat.common import peak_flops
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
print(f"bf16 peak used for MFU: {peak_flops('cuda'):.3e} FLOP/s")
EOF

say "2. flash attention for the models' shapes"
python - <<'EOF'
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
for causal in (False, True):  # the diffusion model (bidirectional) and the GPT (causal)
    q, k, v = (torch.randn(8, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these inputs
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print(f"flash attention runs: bf16, head_dim 64, causal={causal}")
print("block diffusion passes an attention mask: SDPA picks the memory-efficient kernel there, not flash")
EOF

say "3. bf16 + compile training, both models"
python -m nanochat.dataset --from_text README.md DIFFUSION_README.md dev/LOG.md --out "$OUT/shards" --docs_per_shard 8 > "$OUT/data.log"
python -m scripts.tok_train --vocab_size 2048 --data_dir "$OUT/shards" --tokenizer_dir "$OUT/tok" > "$OUT/tok.log"
COMMON=(--depth 4 --max_seq_len 256 --device_batch_size 8 --num_iterations 30 --eval_every 15 --eval_tokens 4096
        --sample_every -1 --save_every -1 --data_dir "$OUT/shards" --tokenizer_dir "$OUT/tok" --compile --dtype bfloat16)
for model in diffusion gpt; do
    python -m scripts.diffusion_train --model "$model" "${COMMON[@]}" --checkpoint_dir "$OUT/ckpt_$model" --overwrite \
        > "$OUT/train_$model.log" 2>&1
    grep -E "parameters|val bpb|step 00030/" "$OUT/train_$model.log"
done

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    say "4. two GPUs, NCCL"
    torchrun --standalone --nproc_per_node=2 -m scripts.diffusion_train -- "${COMMON[@]}" --checkpoint_dir "$OUT/ckpt_ddp" \
        --overwrite > "$OUT/train_ddp.log" 2>&1
    grep -E "world size|val bpb|step 00030/" "$OUT/train_ddp.log"
else
    say "4. one GPU: no NCCL run"
fi

say "5. bench at depth 12, bf16, compiled next to eager"
python -m scripts.bench --depth 12 --max_seq_len 1024 --device_batch_size 16 --vocab_size 65536 --dtype bfloat16 \
    --compile --steps 10 --warmup 3 --sample_steps 32 > "$OUT/bench.json" 2> "$OUT/bench.log"
python - "$OUT/bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for name, tps in r["train_tokens_per_s"].items():
    print(f"{name:40s} {tps:12,.0f} tok/s  MFU {100 * r['mfu'][name]:5.1f}%  peak memory {r['peak_memory_gb'].get(name, 0):.1f} GB")
print("sampling tokens/s:", {k: round(v) for k, v in r["sample_tokens_per_s"].items()})
EOF
say "done: logs in $OUT"
