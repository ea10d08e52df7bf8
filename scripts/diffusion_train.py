"""
Train the diffusion language model (or, by the same loop, --model gpt: the autoregressive baseline, --model masked:
masked diffusion, MDLM).

    python -m scripts.diffusion_train --depth=4 --device_batch_size=1 --num_iterations=100     # CPU smoke run
    python -m scripts.diffusion_train --num_iterations 5000 --depth 12                         # one GPU
    torchrun --nproc_per_node=8 -m scripts.diffusion_train                                     # 8 GPUs

The loop lives in nanochat/train.py (scripts.compare runs the same one). Every field of the model's config is a
flag of the same name (--model gpt --help lists the GPT's). A resumed run (--resume) continues exactly where it
stopped, from the newest intact checkpoint; a fresh run refuses a --checkpoint_dir that holds checkpoints of the
same model (--overwrite deletes them). Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits
(code 130 / 143). --keep_last N keeps the N newest step checkpoints (and always {model}_best.pt).
"""

from nanochat.common import run_main
from nanochat.train import main


if __name__ == "__main__":
    run_main(lambda: main(description=__doc__))
