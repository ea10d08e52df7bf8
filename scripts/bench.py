"""
Throughput of the diffusion model and the masked diffusion model next to a GPT of the same shape, in one process and
one run.

    python -m scripts.bench                                         # depth 4, CPU-sized shapes (~2 minutes on 2 cores)
    python -m scripts.bench --depth 12 --max_seq_len 1024 --device_batch_size 32 --vocab_size 65536 --compile --dtype bfloat16

Every diffusion config field is a flag (--embed_dim, --objective, --block_size, ...), as in scripts.diffusion_train;
the GPT and the masked model take the shape flags.

Prints one JSON object (everything else goes to stderr): the device's peak FLOP/s (measured with a float32
matmul on CPU/MPS, the bf16 table value on CUDA), and for each model the median time of a real training step
(forward + backward + gradient clipping + AdamW/Muon update, under --dtype's autocast) on random tokens, its tokens/s,
MFU and (on CUDA) peak memory, then sampling tokens/s. The models' steps are timed in turn (ABCABC...) so that a noisy
machine slows them alike. With --compile, every model is timed compiled too ("NAME compiled"), next to eager.

Self-conditioning runs its extra no-grad forward pass on a random self_cond_rate of the training steps,
which a median cannot price: the diffusion model is timed with it on every step and with it off, and
"diffusion" is their mix at --self_cond_rate (the expected step time of real training).
"""

import argparse
import json
import sys
from contextlib import redirect_stdout

import torch

from nanochat.common import (
    DTYPES, UserError, add_config_args, autocast_for, compute_init, config_from_args, median_times, peak_flops, run_main, sync,
)
from nanochat.diffusion_roberta import DiffusionConfig, DiffusionRoBERTa
from nanochat.gpt import GPT, GPTConfig
from nanochat.masked_diffusion import MaskedDiffusion, MaskedDiffusionConfig
from nanochat.report import device_name
from nanochat.train import training_step


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_config_args(p, DiffusionConfig)
    p.set_defaults(depth=4, max_seq_len=256, vocab_size=8192)  # random tokens: no data or tokenizer needed
    a("--device_batch_size", type=int, default=4)
    a("--steps", type=int, default=5, help="timed training steps per model")
    a("--warmup", type=int, default=2, help="untimed training steps per model first")
    a("--sample_steps", type=int, default=32, help="denoising steps for a full sequence")
    a("--sample_reps", type=int, default=2, help="timed generate() calls per model")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--compile", action="store_true", help="also time every model under torch.compile (training step, denoiser)")
    a("--dtype", choices=DTYPES, default=None, help="bfloat16: bf16 autocast (the default on CUDA); float32 (the default elsewhere)")
    a("--seed", type=int, default=42)
    return p.parse_args(argv)


def check_args(args):
    for name in ("device_batch_size", "steps", "sample_steps", "sample_reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")


def bench(args, device):
    T, B = args.max_seq_len, args.device_batch_size
    try:
        diffusion_config = lambda self_cond, rate: config_from_args(DiffusionConfig, args, self_cond=self_cond, self_cond_rate=rate)
        torch.manual_seed(args.seed)
        configs = {"gpt": (GPT, config_from_args(GPTConfig, args)),
                   "diffusion_no_self_cond": (DiffusionRoBERTa, diffusion_config(False, 0.0))}
        if args.self_cond:  # self-conditioning on every step: its cost is measured, not left to chance
            configs["diffusion_self_cond_every_step"] = (DiffusionRoBERTa, diffusion_config(True, 1.0))
        configs["masked"] = (MaskedDiffusion, config_from_args(MaskedDiffusionConfig, args))
    except ValueError as e:
        raise UserError(f"bad model settings: {e}") from None
    models = {name: cls.build(config, device) for name, (cls, config) in configs.items()}
    tokens = torch.randint(0, args.vocab_size, (B, T), device=device)
    steps = {name: training_step(m, tokens, False, args.dtype) for name, m in models.items()}
    if args.compile:  # the same models (their own optimisers), compiled: side by side with eager
        steps |= {f"{name} compiled": training_step(m, tokens, True, args.dtype) for name, m in models.items()}
    print(f"timing {args.steps} training steps of {B} x {T} tokens for {', '.join(steps)}", file=sys.stderr)
    memory = peak_memory(steps, device)
    step_time = median_times(steps, args.steps, args.warmup, device)
    flops_per_token = {name: models[name.removesuffix(" compiled")].flops_per_token(T) for name in steps}
    # real training runs the self-conditioning pass on self_cond_rate of its steps: its expected cost is the mix
    r, off = (args.self_cond_rate if args.self_cond else 0.0), "diffusion_no_self_cond"
    on = "diffusion_self_cond_every_step" if args.self_cond else off
    for suffix in ("", " compiled") if args.compile else ("",):
        for d in (step_time, flops_per_token):
            d["diffusion" + suffix] = r * d[on + suffix] + (1 - r) * d[off + suffix]
    peak = peak_flops(device)
    names = list(dict.fromkeys(["gpt", "diffusion", *step_time]))  # the order of the output
    tok_per_s = {name: B * T / step_time[name] for name in names}
    mfu = {name: flops_per_token[name] * tok_per_s[name] / peak for name in names}

    print(f"timing {args.sample_reps} generations of {B} x {T} tokens ({args.sample_steps} denoising steps)", file=sys.stderr)
    gpt, diffusion, masked = models["gpt"].eval(), models[on].eval(), models["masked"].eval()
    samplers = {"gpt": lambda: gpt.generate(B, T, {0: 0}),
                "diffusion": lambda: diffusion.generate(B, T, {0: 0}, num_steps=args.sample_steps),
                "masked": lambda: masked.generate(B, T, {0: 0}, num_steps=args.sample_steps)}
    if args.compile:  # the diffusion model's denoiser compiled (the GPT decodes a growing cache: eager only)
        samplers["diffusion compiled"] = lambda: diffusion.generate(B, T, {0: 0}, num_steps=args.sample_steps, compile=True)
    with autocast_for(device, args.dtype):
        sample_time = median_times(samplers, args.sample_reps, 1, device)
    sample_tok_per_s = {name: B * (T - 1) / t for name, t in sample_time.items()}
    return dict(
        device=device_name(device), torch=torch.__version__,
        peak_flops=peak, peak_flops_source="bf16 dense table" if device.type == "cuda" else "measured float32 matmul",
        args=vars(args),
        num_params=dict(gpt=models["gpt"].num_params(), diffusion=models["diffusion_no_self_cond"].num_params(),
                        masked=models["masked"].num_params()),
        flops_per_token={name: flops_per_token[name] for name in names},
        train_step_s={name: step_time[name] for name in names},
        train_tokens_per_s=tok_per_s,
        mfu=mfu,
        train_tokens_per_s_ratio={name: tok_per_s[name] / tok_per_s["gpt"] for name in names[1:]},
        peak_memory_gb=memory,
        sample_steps=args.sample_steps,
        sample_tokens_per_s=sample_tok_per_s,
        sample_tokens_per_s_ratio={name: sample_tok_per_s[name] / sample_tok_per_s["gpt"] for name in samplers if name != "gpt"},
    )


def peak_memory(steps, device):
    """GB of device memory at the peak of one training step of each (CUDA only: {} elsewhere); one untimed step."""
    if torch.device(device).type != "cuda":
        return {}
    memory = {}
    for name, step in steps.items():
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return memory


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    with redirect_stdout(sys.stderr):  # stdout carries the JSON only
        _, _, _, _, device = compute_init(args.device_type)
        result = bench(args, device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
