"""
Throughput of the diffusion model next to a GPT of the same shape, in one process and one run.

    python -m scripts.bench                                         # depth 4, CPU-sized shapes
    python -m scripts.bench --depth 12 --max_seq_len 1024 --device_batch_size 32 --vocab_size 65536 --compile

Prints one JSON object (everything else goes to stderr): the device's peak FLOP/s (measured with a float32
matmul on CPU/MPS, the bf16 table value on CUDA), and for each model the median time of a real training step
(forward + backward + gradient clipping + AdamW/Muon update, bf16 autocast on CUDA) on random tokens,
its tokens/s and MFU, then sampling tokens/s. The models' steps are timed in turn (ABCABC...) so that a
noisy machine slows them alike.

Self-conditioning runs its extra no-grad forward pass on a random self_cond_rate of the training steps,
which a median cannot price: the diffusion model is timed with it on every step and with it off, and
"diffusion" is their mix at --self_cond_rate (the expected step time of real training).
"""

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext, redirect_stdout

import torch

from nanochat.common import UserError, compute_init, peak_flops, run_main
from nanochat.diffusion_roberta import OBJECTIVES, DiffusionConfig, DiffusionRoBERTa
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import setup_optimizers
from nanochat.report import device_name
from scripts.diffusion_eval import sync


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--depth", type=int, default=4)
    a("--max_seq_len", type=int, default=512)
    a("--device_batch_size", type=int, default=8)
    a("--vocab_size", type=int, default=32768, help="random tokens: no data or tokenizer needed")
    a("--steps", type=int, default=10, help="timed training steps per model")
    a("--warmup", type=int, default=3, help="untimed training steps per model first")
    a("--sample_steps", type=int, default=32, help="denoising steps for a full sequence")
    a("--sample_reps", type=int, default=3, help="timed generate() calls per model")
    # diffusion knobs that change the compute
    a("--self_cond", type=int, choices=[0, 1], default=1)
    a("--self_cond_rate", type=float, default=DiffusionConfig.self_cond_rate)
    a("--embed_dim", type=int, default=DiffusionConfig.embed_dim)
    a("--objective", choices=OBJECTIVES, default=DiffusionConfig.objective)
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--compile", action="store_true", help="torch.compile the models' training forward")
    a("--seed", type=int, default=42)
    return p.parse_args(argv)


def check_args(args):
    for name in ("depth", "max_seq_len", "device_batch_size", "steps", "sample_steps", "sample_reps", "embed_dim"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.vocab_size < 2 or args.warmup < 0:
        raise UserError("--vocab_size must be >= 2 and --warmup >= 0")
    if not 0 <= args.self_cond_rate <= 1:
        raise UserError("--self_cond_rate must lie in [0, 1]")


def autocast_for(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def trainer(model, tokens, compile=False):
    """A function doing one real training step of model on tokens, as scripts/diffusion_train does."""
    device = tokens.device
    optimizers = setup_optimizers(model)
    forward = torch.compile(model) if compile else model
    autocast = autocast_for(device)
    model.train()

    def step():
        with autocast:
            loss = forward(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    return step


def median_times(fns, reps, warmup, device):
    """Median seconds of each named function, called in turn (ABCABC...) after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(args, device):
    T, B = args.max_seq_len, args.device_batch_size
    diffusion_config = lambda self_cond, rate: DiffusionConfig(
        vocab_size=args.vocab_size, depth=args.depth, max_seq_len=T, embed_dim=args.embed_dim, objective=args.objective,
        self_cond=self_cond, self_cond_rate=rate)
    torch.manual_seed(args.seed)
    models = {"gpt": GPT(GPTConfig(vocab_size=args.vocab_size, depth=args.depth, max_seq_len=T)),
              "diffusion_no_self_cond": DiffusionRoBERTa(diffusion_config(False, 0.0))}
    if args.self_cond:  # self-conditioning on every step: its cost is measured, not left to chance
        models["diffusion_self_cond_every_step"] = DiffusionRoBERTa(diffusion_config(True, 1.0))
    tokens = torch.randint(0, args.vocab_size, (B, T), device=device)
    models = {name: m.to(device) for name, m in models.items()}
    print(f"timing {args.steps} training steps of {B} x {T} tokens for {', '.join(models)}", file=sys.stderr)
    step_time = median_times({name: trainer(m, tokens, args.compile) for name, m in models.items()},
                             args.steps, args.warmup, device)
    flops_per_token = {name: m.flops_per_token(T) for name, m in models.items()}
    # real training runs the self-conditioning pass on self_cond_rate of its steps: its expected cost is the mix
    r, off = (args.self_cond_rate if args.self_cond else 0.0), "diffusion_no_self_cond"
    on = "diffusion_self_cond_every_step" if args.self_cond else off
    for d in (step_time, flops_per_token):
        d["diffusion"] = r * d[on] + (1 - r) * d[off]
    peak = peak_flops(device)
    names = ["gpt", "diffusion", *list(models)[1:]]  # the order of the output
    tok_per_s = {name: B * T / step_time[name] for name in names}
    mfu = {name: flops_per_token[name] * tok_per_s[name] / peak for name in names}

    print(f"timing {args.sample_reps} generations of {B} x {T} tokens ({args.sample_steps} denoising steps)", file=sys.stderr)
    gpt, diffusion = models["gpt"].eval(), models[on].eval()
    with autocast_for(device):
        sample_time = median_times({"gpt": lambda: gpt.generate(B, T, prompt=[0]),
                                    "diffusion": lambda: diffusion.generate(B, T, args.sample_steps, prompt=[0])},
                                   args.sample_reps, 1, device)
    sample_tok_per_s = {name: B * (T - 1) / t for name, t in sample_time.items()}
    return dict(
        device=device_name(device), torch=torch.__version__,
        peak_flops=peak, peak_flops_source="bf16 dense table" if device.type == "cuda" else "measured float32 matmul",
        args=vars(args),
        num_params=dict(gpt=models["gpt"].num_params(), diffusion=models["diffusion_no_self_cond"].num_params()),
        flops_per_token={name: flops_per_token[name] for name in names},
        train_step_s={name: step_time[name] for name in names},
        train_tokens_per_s=tok_per_s,
        mfu=mfu,
        train_tokens_per_s_ratio={name: tok_per_s[name] / tok_per_s["gpt"] for name in names[1:]},
        sample_steps=args.sample_steps,
        sample_tokens_per_s=sample_tok_per_s,
        sample_tokens_per_s_ratio=sample_tok_per_s["diffusion"] / sample_tok_per_s["gpt"],
    )


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    with redirect_stdout(sys.stderr):  # stdout carries the JSON only
        _, _, _, _, device = compute_init(args.device_type)
        result = bench(args, device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
