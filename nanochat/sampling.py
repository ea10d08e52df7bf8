"""
Helpers shared by the sampling, evaluation and demo scripts: prompt / infill templates, batched
generation with a progress bar for either model type, and decoding.

Every sample starts with BOS (documents do in training), so position 0 is always known:
    unconditional   [BOS] + seq_len - 1 free positions
    --prompt TEXT   [BOS] + TEXT's tokens + free positions up to seq_len
    --infill T      [BOS] + T's text pieces, each [BLANK:N] marker becoming N free positions; free
                    positions after the template only when seq_len is longer than it
"""

import re
import torch

from nanochat.common import UserError
from nanochat.diffusion_roberta import NOISE_SCALE, SAMPLERS, SCORE_TEMPERATURE

BLANK = re.compile(r"\[BLANK:(\d+)\]")


def parse_infill(template):
    """'a [BLANK:3] b' -> ['a ', 3, ' b']: text pieces and gap sizes, in order (empty pieces dropped)."""
    parts = BLANK.split(template)
    pieces = [int(p) if i % 2 else p for i, p in enumerate(parts)]
    gaps = [p for p in pieces if isinstance(p, int)]
    if not gaps:
        raise UserError("the infill template has no gap: mark each gap as [BLANK:N], e.g. 'The [BLANK:5] sat on the mat.'")
    if any(g < 1 for g in gaps):
        raise UserError("infill gaps need at least one token: [BLANK:N] with N >= 1")
    if any(isinstance(p, str) and "[BLANK" in p for p in pieces):
        raise UserError("malformed gap marker in the infill template: write [BLANK:N] with N a number of tokens")
    return [p for p in pieces if p != ""]


def build_infill(tokenizer, template):
    """(known {position: id} including BOS at 0, template length in tokens, text pieces in order)."""
    known, pos, pieces = {0: tokenizer.get_bos_token_id()}, 1, parse_infill(template)
    for piece in pieces:
        if isinstance(piece, int):
            pos += piece
        else:
            for tok in tokenizer.encode(piece):
                known[pos] = tok
                pos += 1
    return known, pos, [p for p in pieces if isinstance(p, str)]


def decode(tokenizer, ids):
    """Text of a sample, without the BOS it starts with (later BOS tokens show as <|bos|>)."""
    ids = list(ids)
    if ids and ids[0] == tokenizer.get_bos_token_id():
        ids = ids[1:]
    return tokenizer.decode(ids)


def add_sampler_args(parser):
    """The diffusion sampler's flags (a GPT ignores them), shared by the sampling, evaluation and comparison scripts."""
    a = parser.add_argument
    a("--sampler", default="ddpm", help=f"one of {', '.join(SAMPLERS)} (ancestral / deterministic)")
    a("--noise_scale", type=float, default=NOISE_SCALE, help="scales the ancestral noise (1 = the reverse process's)")
    a("--score_temperature", type=float, default=SCORE_TEMPERATURE,
      help="divides the predicted noise: < 1 sharpens every step (1 = the reverse process's)")
    a("--clamp", action="store_true", help="snap every x0 estimate to its nearest token embedding (Diffusion-LM)")


def check_sampler_args(args):
    if args.sampler not in SAMPLERS:
        raise UserError(f"unknown --sampler {args.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if not args.noise_scale >= 0:
        raise UserError(f"--noise_scale must be >= 0, got {args.noise_scale}")
    if not args.score_temperature > 0:
        raise UserError(f"--score_temperature must be > 0, got {args.score_temperature}")


def sampler_options(args):
    """The add_sampler_args flags as keyword arguments of DiffusionRoBERTa.generate."""
    return dict(sampler=args.sampler, noise_scale=args.noise_scale, score_temperature=args.score_temperature, clamp=args.clamp)


def describe_sampler(options, num_steps=None):
    """'128 ddpm steps, noise x0.85, score temperature 0.9' (what a report says about how samples were drawn)."""
    how = f"{num_steps} {options['sampler']} steps" if num_steps else options["sampler"]
    if options["sampler"] == "ddpm" and options["noise_scale"] != 1:
        how += f", noise x{options['noise_scale']:g}"
    if options["score_temperature"] != 1:
        how += f", score temperature {options['score_temperature']:g}"
    return how + (", clamped" if options["clamp"] else "")


def generate(model, model_type, num_samples, seq_len, known, num_steps=100, temperature=1.0, batch_size=None,
             generator=None, bar=None, **options):
    """(num_samples, seq_len) token ids in batches of batch_size. known = {position: id} with BOS at 0
    (for a GPT it must be a prefix). bar: a tqdm bar over batches x steps, advanced after every step.
    options: sampler_options() for a diffusion model."""
    batch_size = batch_size or num_samples
    out = []
    for start in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - start)
        done = bar.n if bar is not None else 0
        if model_type == "gpt":
            assert sorted(known) == list(range(len(known))), "a GPT can only continue a prefix"
            prompt = [known[i] for i in range(len(known))]
            out.append(model.generate(b, seq_len, prompt=prompt, temperature=temperature, generator=generator))
        else:
            step = (lambda i: bar.update(1)) if bar is not None else None
            out.append(model.generate(b, seq_len, num_steps, temperature=temperature, known=known, generator=generator,
                                      callback=step, **options))
        if bar is not None:  # exact per batch, whatever the step count per call
            bar.update(done + bar_steps(model, model_type, seq_len, num_steps) - bar.n)
    return torch.cat(out)


def bar_steps(model, model_type, seq_len, num_steps):
    """Progress units per batch: denoising steps, num_steps per block (a GPT's batch counts as one unit)."""
    if model_type == "gpt":
        return 1
    return -(-seq_len // (model.config.block_size or seq_len)) * num_steps
