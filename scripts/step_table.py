"""
Sample quality by step count: diffusion checkpoints (a teacher and its distilled students, say) judged by a GPT, each
next to the GPT's own samples.

    python -m scripts.step_table --judge checkpoints/gpt_best.pt --checkpoints TEACHER.pt distill/steps_*/diffusion_step_000300.pt

A checkpoint that is not distilled is sampled at every --steps with every --samplers: ddpm is its default sampler,
ddim the deterministic one that scripts.diffusion_distill distils (score temperature 1). A distilled checkpoint is
sampled at its own step count with its own default sampler (N DDIM steps). Every setting draws --num_samples samples
of --sample_len tokens from BOS with the same seed; the judge scores them (generative NLL, nats per token) and the
table gives it and the unigram entropy as ratios to those of the GPT's own samples at temperature 1 (low entropy,
repetitive text, fakes a low NLL: read the two together). With --eval_tokens, each diffusion checkpoint's validation
bits per byte (its likelihood bound, from its x0 estimates) too. Prints a markdown table; --output writes the JSON.
"""

import argparse
import json
import os
import time

import torch

from nanochat.checkpoint import load_model
from nanochat.common import UserError, autocast_for, check_seed, check_writable, compute_init, finite, fmt, run_main, sync
from nanochat.dataloader import DataLoader
from nanochat.evaluate import evaluate_bpb
from nanochat.sample_quality import sample_quality
from nanochat.sampling import generate, sampler_settings

SAMPLERS = {"ddpm": {}, "ddim": dict(sampler="ddim", score_temperature=1.0)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--judge", required=True, help="gpt checkpoint: the judge and the reference (its own samples at temperature 1)")
    a("--checkpoints", nargs="+", required=True, help="diffusion checkpoints (the same tokenizer as the judge)")
    a("--steps", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[4, 8, 32, 128],
      help="step counts for the checkpoints that are not distilled")
    a("--samplers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(SAMPLERS),
      help=f"for the checkpoints that are not distilled: {' and/or '.join(SAMPLERS)}")
    a("--num_samples", type=int, default=64)
    a("--sample_len", type=int, default=128, help="tokens per sample, BOS included")
    a("--batch_size", type=int, default=None, help="samples per generate() call (default: all at once)")
    a("--temperature", type=float, default=1.0, help="the diffusion models' logits temperature")
    a("--eval_tokens", type=int, default=0, help="validation tokens for each diffusion checkpoint's bound (0 = skip)")
    a("--bound_samples", type=int, default=None, help="timesteps per sequence for the bound (default: each model's)")
    a("--data_dir", default=None, help="parquet shards; the last one is the val split (for --eval_tokens)")
    a("--output", default=None, help="also write every number to this JSON file")
    a("--seed", type=int, default=42)
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--dtype", choices=("float32", "bfloat16"), default=None, help="bfloat16 autocast (the default on CUDA)")
    return p.parse_args(argv)


def check_args(args):
    for name in ("num_samples", "sample_len"):
        if getattr(args, name) < (2 if name == "sample_len" else 1):
            raise UserError(f"--{name} must be >= {2 if name == 'sample_len' else 1}, got {getattr(args, name)}")
    if not args.steps or min(args.steps) < 1:
        raise UserError(f"--steps needs step counts >= 1, e.g. 4,8,32,128, got {args.steps}")
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown or not args.samplers:
        raise UserError(f"--samplers takes {', '.join(SAMPLERS)}, got {','.join(args.samplers) or 'nothing'}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.eval_tokens < 0 or (args.bound_samples is not None and args.bound_samples < 1):
        raise UserError("--eval_tokens must be >= 0 and --bound_samples >= 1")
    check_seed(args.seed)
    if args.output:
        check_writable(args.output, "--output", kind="file")


def settings(path, model, args):
    """(label, generate() options) for every setting of one checkpoint."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path)
    if model.config.distilled_steps:
        return [(f"{name} (distilled)", {})]
    return [(name, dict(SAMPLERS[s], num_steps=n)) for n in args.steps for s in args.samplers]


def sample_row(model, label, options, args, bos, judge, device, autocast, temperature):
    g = torch.Generator(device=device).manual_seed(args.seed)
    how = sampler_settings(model, temperature, options)
    sync(device)
    t0 = time.perf_counter()
    with autocast:
        ids = generate(model, args.num_samples, args.sample_len, {0: bos}, temperature, args.batch_size, g, **options)
    sync(device)
    seconds = time.perf_counter() - t0
    with autocast:
        quality = sample_quality([row[1:] for row in ids.tolist()], judge, bos)
    print(f"{label}, {model.describe_sampler(how)}: judge NLL {quality['gen_nll']:.3f} ± {quality['gen_nll_stderr']:.3f}, entropy "
          f"{quality['unigram_entropy_nats']:.3f}, {seconds:.1f}s")
    return dict(label=label, sampler=model.describe_sampler(how), steps=how.get("num_steps"), seconds=seconds, **quality)


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    autocast = autocast_for(device, args.dtype)
    judge, tokenizer, _ = load_model(args.judge, device, expect="gpt")
    if args.sample_len > judge.config.max_seq_len:
        raise UserError(f"--sample_len {args.sample_len} is longer than the judge's max_seq_len {judge.config.max_seq_len}")
    bos = tokenizer.get_bos_token_id()
    rows = [sample_row(judge, "GPT T=1.0 (reference)", {}, args, bos, judge, device, autocast, 1.0)]
    bounds = {}
    for path in args.checkpoints:
        model, tok, ckpt = load_model(path, device, expect="diffusion")
        if tok.identity != tokenizer.identity:
            raise UserError(f"{path} uses another tokenizer than the judge {args.judge}")
        if args.sample_len > model.config.max_seq_len:
            raise UserError(f"--sample_len {args.sample_len} is longer than {path}'s max_seq_len {model.config.max_seq_len}")
        for label, options in settings(path, model, args):
            rows.append(sample_row(model, label, options, args, bos, judge, device, autocast, args.temperature))
        if args.eval_tokens:
            bounds[path] = validation_bpb(model, tokenizer, args, device, autocast)
    for r in rows:
        r["nll_ratio"] = r["gen_nll"] / rows[0]["gen_nll"]
        r["entropy_ratio"] = r["unigram_entropy_nats"] / rows[0]["unigram_entropy_nats"]
    print_tables(rows, bounds, args)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(finite(dict(args=vars(args), rows=rows, val_bpb=bounds)), f, indent=2)
        print(f"wrote {args.output}")


def validation_bpb(model, tokenizer, args, device, autocast):
    if args.bound_samples:
        model.config.bound_samples = args.bound_samples
    T = model.config.max_seq_len
    rows = max(1, min(8, args.eval_tokens // T))
    loader = DataLoader(tokenizer, rows, T, "val", args.data_dir, device=device)
    batches = [b for _, b in zip(range(max(1, args.eval_tokens // (rows * T))), loader)]
    torch.manual_seed(args.seed)
    with autocast:
        return evaluate_bpb(model, batches, tokenizer.token_bytes(device))


def print_tables(rows, bounds, args):
    print(f"\n{args.num_samples} samples x {args.sample_len} tokens from BOS per setting, logits temperature "
          f"{args.temperature:g}; ratios to the GPT's own samples\n")
    print("| checkpoint | sampler | judge NLL | / GPT's | unigram entropy | / GPT's | distinct-2 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['sampler']} | {r['gen_nll']:.3f} ± {r['gen_nll_stderr']:.3f} | {r['nll_ratio']:.3f} | {r['unigram_entropy_nats']:.3f} | "
              f"{r['entropy_ratio']:.3f} | {fmt(r['distinct_2'], '.3f')} | {r['seconds']:.1f} |")
    if bounds:
        print("\n| checkpoint | validation bpb (bound) |\n|---|---|")
        for path, b in bounds.items():
            print(f"| {path} | {b['bpb']:.4f} ± {b['stderr']:.4f} ({b['tokens']:,} tokens) |")


if __name__ == "__main__":
    run_main(main)
