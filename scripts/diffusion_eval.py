"""
Evaluate a checkpoint: validation loss and bits per byte, training and sampling throughput, sample quality.

    python -m scripts.diffusion_eval --checkpoint checkpoints/diffusion_step_005000.pt --eval_tokens 1048576
    python -m scripts.diffusion_eval --checkpoint FILE --judge checkpoints/gpt_step_005000.pt --output eval.json

For a diffusion checkpoint the bits per byte come from the likelihood bound (an upper bound, with its
standard error over sequences); for a GPT checkpoint they are exact. Blocks of the model's max_seq_len
tokens are read from the val split, at most --eval_tokens of them (fewer when the split is smaller: the
number used is reported). Sample quality is measured on --num_samples samples of --sample_len tokens, each
started from BOS; generative perplexity needs an autoregressive judge (--judge, a gpt checkpoint with the
same tokenizer). Metric definitions: nanochat/sample_quality.py.

For a diffusion checkpoint, "context gain by noise level" compares, at --context_levels noise levels spread
over the model's log-SNR range, the model's cross-entropy on the first validation batch with that of the best
denoiser that sees each token alone (unigram prior from the train split x the token's own Gaussian
likelihood). Where the gain is near zero the model has learned nothing about context at that noise level.
"""

import argparse
import itertools
import json
import os
import time

import torch

from nanochat.checkpoint import load_model
from nanochat.common import UserError, autocast_for, check_seed, check_writable, compute_init, finite, fmt, peak_flops, run_main, sync
from nanochat.dataloader import DataLoader
from nanochat.evaluate import evaluate_bpb, evaluate_loss, unigram_log_prior
from nanochat.sample_quality import load_judge, sample_quality
from nanochat.sampling import add_sampler_args, decode, generate, sampler_options, sampler_settings


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="diffusion or gpt model file")
    a("--eval_tokens", type=int, default=2**20, help="validation tokens to evaluate on (at most)")
    a("--data_dir", default=None, help="parquet shards; the last one is the val split (default: $NANOCHAT_BASE_DIR/base_data)")
    a("--batch_size", type=int, default=32, help="rows of max_seq_len tokens per forward pass")
    a("--bound_samples", type=int, default=None, help="timesteps per sequence for the likelihood bound (default: the model's)")
    a("--throughput_steps", type=int, default=10, help="timed forward+backward passes for training throughput (0 = skip)")
    a("--num_samples", type=int, default=32, help="samples for sampling throughput and quality (0 = skip)")
    a("--sample_len", type=int, default=None, help="tokens per sample, BOS included (default: 128, capped at max_seq_len)")
    a("--sample_steps", type=int, default=None, help="denoising steps per sample (default: the model's: 128, or a distilled checkpoint's own)")
    a("--temperature", type=float, default=1.0, help="divides the logits and scales the sampler's noise")
    a("--context_levels", type=int, default=7, help="noise levels for the context-gain table (diffusion only; 0 = skip)")
    a("--judge", default=None, help="gpt checkpoint for generative perplexity (same tokenizer)")
    a("--output", default=None, help="also write the results to this JSON file")
    a("--seed", type=int, default=42)
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    add_sampler_args(p)
    return p.parse_args(argv)


def check_args(args):
    for name in ("eval_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("throughput_steps", "num_samples", "context_levels"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.bound_samples is not None and args.bound_samples < 1:
        raise UserError(f"--bound_samples must be >= 1, got {args.bound_samples}")
    if args.sample_len is not None and args.sample_len < 2:
        raise UserError(f"--sample_len must be >= 2 (BOS + at least one token), got {args.sample_len}")
    check_seed(args.seed)
    if args.output:
        check_writable(args.output, "--output", kind="file")


def val_batches(tokenizer, args, seq_len, device):
    """(up to --eval_tokens of the val split as (B, seq_len) blocks, B = --batch_size or fewer; whether
    the split ran out first)."""
    rows = max(1, min(args.batch_size, args.eval_tokens // seq_len))
    while rows >= 1:  # a split smaller than one batch: fewer rows per batch
        wanted = max(1, args.eval_tokens // (rows * seq_len))
        loader = DataLoader(tokenizer, rows, seq_len, "val", args.data_dir, device=device)
        batches = [b for _, b in zip(range(wanted), loader)]
        if batches:
            return batches, len(batches) < wanted
        rows //= 2
    raise UserError(f"the val split has fewer than {seq_len} tokens (one block of the model's max_seq_len)")


def train_throughput(model, batch, steps, device, autocast):
    """Forward+backward tokens/s of the training loss (no optimizer step; gradients are discarded)."""
    model.train()
    try:
        for i in range(steps + 2):  # two untimed warm-up passes
            if i == 2:
                sync(device)
                t0 = time.perf_counter()
            with autocast:
                loss = model(batch)
            loss.backward()
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    tok_per_s = steps * batch.numel() / dt
    return dict(tokens_per_s=tok_per_s, mfu=model.flops_per_token(batch.size(1)) * tok_per_s / peak_flops(device),
                batch=list(batch.shape), steps=steps)


def sample_throughput(model, args, options, sample_len, bos, device, autocast):
    """(generated token ids (num_samples, sample_len), generated tokens/s excluding the BOS prompt)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    with autocast:
        generate(model, 1, min(sample_len, 4), {0: bos}, args.temperature, **options)  # warm-up, not from g
        sync(device)
        t0 = time.perf_counter()
        ids = generate(model, args.num_samples, sample_len, {0: bos}, args.temperature, args.batch_size, g, **options)
        sync(device)
    dt = time.perf_counter() - t0
    return ids, args.num_samples * (sample_len - 1) / dt


def measure_context_gain(model, tokenizer, args, tokens, device, prior_tokens=2**20):
    c = model.config
    train = DataLoader(tokenizer, tokens.size(0), tokens.size(1), "train", args.data_dir, device=device)
    log_prior = unigram_log_prior(itertools.islice(train, max(1, prior_tokens // tokens.numel())), c.vocab_size)
    gammas = torch.linspace(c.gamma_min, c.gamma_max, args.context_levels).tolist()
    return model.context_gain(tokens, log_prior, gammas, seed=args.seed)


def print_table(r):
    v, kind = r["val"], r["model_type"]
    rows = [
        ("validation loss (the training objective)", fmt(v["loss"])),
        (f"validation bpb ({r['nll_kind']})", f"{fmt(v['bpb'])} ± {fmt(v['bpb_stderr'])}"),
        ("validation tokens used", f"{v['tokens']:,} of {v['tokens_requested']:,} requested"
                                   + (" (the val split is smaller)" if v["split_exhausted"] else "")),
    ]
    t = r["train_throughput"]
    rows.append(("training throughput (fwd+bwd)", "skipped (--throughput_steps 0)" if t is None else
                 f"{t['tokens_per_s']:,.0f} tok/s, MFU {100 * t['mfu']:.2f}%"))
    s, q = r["sampling"], r["sample_quality"]
    if s is None:
        rows.append(("sampling / sample quality", "skipped (--num_samples 0)"))
    else:
        rows += [
            (f"sampling throughput ({s['how']})", f"{s['tokens_per_s']:,.0f} tok/s ({s['num_samples']} x {s['sample_len']} tokens)"),
            ("unigram entropy (nats, mean per sample)", fmt(q["unigram_entropy_nats"], ".3f")),
            ("distinct-1 / distinct-2", f"{fmt(q['distinct_1'], '.3f')} / {fmt(q['distinct_2'], '.3f')}"),
            ("repetition rate (repeated 4-grams)", fmt(q["repetition_rate_4gram"], ".3f")),
            ("generative perplexity (judge)", "skipped (no --judge)" if q["gen_ppl"] is None else
             f"{q['gen_ppl']:.2f} (nll {q['gen_nll']:.3f} nats/token)"),
        ]
    for row in r["context_gain"] or []:
        rows.append((f"CE at gamma {row['gamma']:+.2f}: model / token alone", f"{row['model_ce']:.3f} / "
                     f"{row['no_context_ce']:.3f} nats (context gain {row['gain']:+.3f})"))
    width = max(len(name) for name, _ in rows)
    print(f"\n{kind} checkpoint {r['checkpoint']} (step {r['step']}) on {r['device']}")
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 40))


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    model_type, T = ckpt["model_type"], model.config.max_seq_len
    options = sampler_options(args, num_steps=args.sample_steps)
    settings = sampler_settings(model, args.temperature, options)
    sample_len = args.sample_len or min(128, T)
    if sample_len > T:
        raise UserError(f"--sample_len {sample_len} is larger than the model's maximum sequence length {T}")
    judge = None
    if args.judge and args.num_samples:
        judge = load_judge(args.judge, tokenizer, device)
        if sample_len > judge.config.max_seq_len:
            raise UserError(f"--sample_len {sample_len} is longer than the judge's max_seq_len {judge.config.max_seq_len}")
    if args.bound_samples:
        if not hasattr(model.config, "bound_samples"):
            raise UserError(f"--bound_samples: this {model_type} checkpoint has no likelihood bound (its bits per byte are exact)")
        model.config.bound_samples = args.bound_samples
    autocast = autocast_for(device, args.dtype)
    bos = tokenizer.get_bos_token_id()

    batches, exhausted = val_batches(tokenizer, args, T, device)
    read = sum(b.numel() for b in batches)
    print(f"evaluating on {read:,} validation tokens ({len(batches)} batches of {batches[0].size(0)} x {T})")
    torch.manual_seed(args.seed)
    with autocast:
        loss = evaluate_loss(model, batches)
        bpb = evaluate_bpb(model, batches, tokenizer.token_bytes(device))
    result = dict(checkpoint=args.checkpoint, model_type=model_type, nll_kind=model.nll_kind, step=ckpt["step"], device=str(device),
                  config=model.config.to_dict(), num_params=model.num_params(),
                  val=dict(loss=loss, bpb=bpb["bpb"], bpb_stderr=bpb["stderr"], tokens=read,
                           tokens_requested=args.eval_tokens, split_exhausted=exhausted),
                  train_throughput=None, sampling=None, sample_quality=None, samples=[], context_gain=None)

    if args.context_levels and hasattr(model, "context_gain"):  # a diffusion model's use of context by noise level
        print("measuring context gain by noise level")
        result["context_gain"] = measure_context_gain(model, tokenizer, args, batches[0], device)

    if args.throughput_steps:
        print("measuring training throughput")
        result["train_throughput"] = train_throughput(model, batches[0], args.throughput_steps, device, autocast)
    if args.num_samples:
        print(f"sampling {args.num_samples} x {sample_len} tokens")
        ids, tok_per_s = sample_throughput(model, args, options, sample_len, bos, device, autocast)
        samples = [row[1:] for row in ids.tolist()]  # without the BOS they start from
        result["sampling"] = dict(tokens_per_s=tok_per_s, num_samples=args.num_samples, sample_len=sample_len,
                                  temperature=args.temperature, how=model.describe_sampler(settings), **settings)
        with autocast:
            result["sample_quality"] = dict(sample_quality(samples, judge, bos), judge=args.judge)
        result["samples"] = [decode(tokenizer, row) for row in ids.tolist()]

    print_table(result)
    for i, text in enumerate(result["samples"][:3]):
        print(f"sample {i + 1}: {text!r}")
    if args.output:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(finite(result), f, indent=2, ensure_ascii=False)
        except OSError as e:
            raise UserError(f"cannot write --output {args.output}: {e.strerror}") from None
        print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
