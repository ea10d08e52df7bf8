"""
Generate text from a trained checkpoint by iterative denoising (a GPT checkpoint samples autoregressively).

    python -m scripts.diffusion_sample --checkpoint checkpoints/diffusion_step_005000.pt --num_samples 5 --seq_len 128 --num_steps 100
    python -m scripts.diffusion_sample --checkpoint FILE --prompt "To be, or not to be"        # completion
    python -m scripts.diffusion_sample --checkpoint FILE --infill "The [BLANK:8] of the [BLANK:4]."   # infilling

Every sample starts with BOS. A prompt is kept unchanged at the start of the text; an infill template's
text pieces are kept unchanged and each [BLANK:N] becomes N generated tokens. --seq_len defaults to 128
(capped at the model's max_seq_len), and for --infill to the template's length; a longer --seq_len adds
free positions after the template. Samples are reproducible for a given --seed and --batch_size.
"""

import argparse
import json
import os

import torch
from tqdm import tqdm

from nanochat.checkpoint import load_model
from nanochat.common import UserError, autocast_for, check_seed, check_writable, compute_init, run_main
from nanochat.sampling import add_sampler_args, build_infill, decode, generate, parse_infill, progress_total, sampler_options, sampler_settings


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="model file, e.g. checkpoints/diffusion_step_005000.pt")
    a("--num_samples", type=int, default=5)
    a("--seq_len", type=int, default=None, help="tokens per sample, BOS included (default: 128, or the infill template's length)")
    a("--num_steps", type=int, default=None, help="denoising steps (default: the model's: 128, or a distilled checkpoint's own)")
    a("--temperature", type=float, default=1.0, help="divides the logits and scales the sampler's noise")
    a("--batch_size", type=int, default=None, help="samples per generate() call (default: all at once)")
    a("--seed", type=int, default=42)
    a("--prompt", default=None, help="text that every sample starts with")
    a("--infill", default=None, help="text with [BLANK:N] gaps of N tokens to fill in")
    a("--output", default=None, help="also write the samples to this .jsonl file, one JSON object per line")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    add_sampler_args(p)
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be checked without the checkpoint."""
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq_len must be >= 1, got {args.seq_len}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.prompt is not None and args.infill is not None:
        raise UserError("use --prompt or --infill, not both")
    if args.infill is not None:
        parse_infill(args.infill)
    check_seed(args.seed)
    if args.output:
        check_writable(args.output, "--output", kind="file")


def plan(args, tokenizer, model):
    """(seq_len, known {position: id}) for the request; UserError when it cannot fit."""
    bos, max_seq_len = tokenizer.get_bos_token_id(), model.config.max_seq_len
    if args.seq_len is not None and args.seq_len > max_seq_len:
        raise UserError(f"--seq_len {args.seq_len} is larger than the model's maximum sequence length {max_seq_len}")
    if args.infill is not None:
        if not model.can_infill:
            raise UserError("--infill needs a whole-sequence diffusion model: this checkpoint writes left to right (a GPT, or "
                            "block diffusion) and cannot see the text after a gap; use --prompt, or train with --block_size 0")
        known, length, _ = build_infill(tokenizer, args.infill)
        seq_len = args.seq_len or length
        if length > seq_len or length > max_seq_len:
            limit = min(seq_len, max_seq_len)
            raise UserError(f"the infill template is {length} tokens (BOS + text + gaps), longer than {limit} "
                            f"({'--seq_len' if args.seq_len else 'the model maximum'}); shorten it")
        return seq_len, known
    seq_len = args.seq_len or min(128, max_seq_len)
    ids = [bos] + (tokenizer.encode(args.prompt) if args.prompt else [])
    if len(ids) > seq_len:
        raise UserError(f"the prompt is {len(ids)} tokens (with BOS), longer than --seq_len {seq_len}; "
                        f"shorten it or raise --seq_len (at most {max_seq_len})")
    return seq_len, dict(enumerate(ids))


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    seq_len, known = plan(args, tokenizer, model)
    options = sampler_options(args, num_steps=args.num_steps)
    settings = sampler_settings(model, args.temperature, options)
    print(f"{ckpt['model_type']} checkpoint {args.checkpoint} (step {ckpt['step']}): {args.num_samples} samples x {seq_len} "
          f"tokens, {model.describe_sampler(settings)}, temperature {args.temperature}, seed {args.seed}")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    total = progress_total(model, args.num_samples, seq_len, known, args.batch_size, args.temperature, **options)
    with tqdm(total=total, desc="sampling", unit="step") as bar, autocast_for(device, args.dtype):
        ids = generate(model, args.num_samples, seq_len, known, args.temperature, args.batch_size, generator, bar, **options)

    records = []
    for i, row in enumerate(ids.tolist()):
        text = decode(tokenizer, row)
        print(f"\n--- sample {i + 1}/{args.num_samples} ---\n{text}")
        records.append(dict(text=text, tokens=row, prompt=args.prompt, infill=args.infill, temperature=args.temperature,
                            sampling=model.describe_sampler(settings), **settings, seed=args.seed, checkpoint=args.checkpoint))
    if args.output:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        except OSError as e:
            raise UserError(f"cannot write --output {args.output}: {e.strerror}") from None
        print(f"\nwrote {len(records)} samples to {args.output}")


if __name__ == "__main__":
    run_main(main)
