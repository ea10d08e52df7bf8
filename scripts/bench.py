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
MFU and (on CUDA) peak memory. The models' steps are timed in turn (ABCABC...) so that a noisy machine slows them
alike. With --compile, every model is timed compiled too ("NAME compiled"), next to eager.

Then sampling a full sequence of max_seq_len tokens, two ways: latency (sample_latency_s: seconds to a finished sample
at batch 1) and throughput (sample_tokens_per_s: generated tokens/s at --sample_batch_size), the GPT decoding with
its KV cache next to each diffusion model at every --sample_steps ("diffusion 8 steps": a student distilled for 8
steps samples exactly so), with ratios to the GPT's; with --compile, the continuous model's denoiser compiled too.

Self-conditioning runs its extra no-grad forward pass on a random self_cond_rate of the training steps,
which a median cannot price: the diffusion model is timed with it on every step and with it off, and
"diffusion" is their mix at --self_cond_rate (the expected step time of real training).
"""

import argparse
import json
import sys
from contextlib import redirect_stdout
from functools import partial

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
    a("--sample_steps", type=step_list, default=[4, 8, 32, 128], help="denoising step counts, comma-separated")
    a("--sample_batch_size", type=int, default=16, help="samples per generate() call for throughput (latency: 1)")
    a("--sample_reps", type=int, default=1, help="timed generate() calls per model and setting")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--compile", action="store_true", help="also time every model under torch.compile (training step, denoiser)")
    a("--dtype", choices=DTYPES, default=None, help="bfloat16: bf16 autocast (the default on CUDA); float32 (the default elsewhere)")
    a("--seed", type=int, default=42)
    return p.parse_args(argv)


def step_list(text):
    return [int(s) for s in text.split(",") if s.strip()]


def check_args(args):
    for name in ("device_batch_size", "steps", "sample_batch_size", "sample_reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.sample_steps or min(args.sample_steps) < 1:
        raise UserError(f"--sample_steps needs step counts >= 1, e.g. 4,8,32,128, got {args.sample_steps}")
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

    gpt, diffusion, masked = models["gpt"].eval(), models[on].eval(), models["masked"].eval()
    with autocast_for(device, args.dtype):
        latency, throughput = sampling(args, gpt, diffusion, masked, device)
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
        sample_seq_len=T,
        sample_batch_size=args.sample_batch_size,
        sample_latency_s=latency,
        sample_latency_ratio={name: t / latency["gpt"] for name, t in latency.items() if name != "gpt"},
        sample_tokens_per_s=throughput,
        sample_tokens_per_s_ratio={name: r / throughput["gpt"] for name, r in throughput.items() if name != "gpt"},
    )


def sampling(args, gpt, diffusion, masked, device):
    """Sampling a full sequence (max_seq_len tokens, the first one given) two ways: latency, the seconds to a finished
    sample at batch 1, and throughput, generated tokens/s at --sample_batch_size; the GPT decoding with its KV cache,
    the diffusion models at every --sample_steps (with --compile, the continuous model's denoiser compiled too).
    Each sampler runs once untimed at each batch size first (allocation, compilation)."""
    T = args.max_seq_len
    steppers = {"diffusion": lambda B, s: diffusion.generate(B, T, {0: 0}, num_steps=s)}
    if args.compile:
        steppers["diffusion compiled"] = lambda B, s: diffusion.generate(B, T, {0: 0}, num_steps=s, compile=True)
    steppers["masked"] = lambda B, s: masked.generate(B, T, {0: 0}, num_steps=s)
    samplers = {"gpt": lambda B: gpt.generate(B, T, {0: 0})}
    samplers |= {f"{name} {s} steps": partial(f, s=s) for name, f in steppers.items() for s in args.sample_steps}
    results = []
    for B in (1, args.sample_batch_size):
        gpt.generate(B, 2, {0: 0})
        for f in steppers.values():
            f(B, 1)
        print(f"timing {args.sample_reps} generation(s) of {B} x {T} tokens: {', '.join(samplers)}", file=sys.stderr)
        results.append(median_times({name: partial(f, B) for name, f in samplers.items()}, args.sample_reps, 0, device))
    latency, batch_time = results
    return latency, {name: args.sample_batch_size * (T - 1) / t for name, t in batch_time.items()}


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
