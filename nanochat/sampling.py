"""
Helpers shared by the sampling, evaluation, comparison and demo scripts: prompt / infill templates, the sampler
flags, batched generation with a progress bar for any model, and decoding.

Every sample starts with BOS (documents do in training), so position 0 is always known:
    unconditional   [BOS] + seq_len - 1 free positions
    --prompt TEXT   [BOS] + TEXT's tokens + free positions up to seq_len
    --infill T      [BOS] + T's text pieces, each [BLANK:N] marker becoming N free positions; free
                    positions after the template only when seq_len is longer than it
"""

import re
import torch

from nanochat.common import DTYPES, UserError
from nanochat.diffusion_roberta import SAMPLERS, DiffusionRoBERTa

BLANK = re.compile(r"\[BLANK:(\d+)\]")
LOOKS_LIKE_BLANK = re.compile(r"\[BLANK[^\]]*\]?")  # what a user meant as a gap marker, well-formed or not


def parse_infill(template):
    """'a [BLANK:3] b' -> ['a ', 3, ' b']: text pieces and gap sizes, in order (empty pieces dropped)."""
    parts = BLANK.split(template)
    pieces = [int(p) if i % 2 else p for i, p in enumerate(parts)]
    for piece in pieces[::2]:  # the text between the well-formed markers
        malformed = LOOKS_LIKE_BLANK.search(piece)
        if malformed:  # said before "no gap": [BLANK:-3] alone is a gap written wrong
            raise UserError(f"malformed gap marker {malformed.group()!r} in the infill template: write [BLANK:N] with N "
                            f"a number of tokens, e.g. [BLANK:5]")
    gaps = [p for p in pieces if isinstance(p, int)]
    if not gaps:
        raise UserError("the infill template has no gap: mark each gap as [BLANK:N], e.g. 'The [BLANK:5] sat on the mat.'")
    if any(g < 1 for g in gaps):
        raise UserError("infill gaps need at least one token: [BLANK:N] with N >= 1")
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


def add_sampler_args(parser, conditioning=True):
    """Flags for the options of a model's generate() (its sampler_defaults). A flag left out keeps the model's
    default; one the model has no use for is an error (a GPT has no sampler options). conditioning=False leaves out
    --label and --guidance (for scripts whose models are trained without labels)."""
    d = DiffusionRoBERTa.sampler_defaults
    a = parser.add_argument
    a("--sampler", default=None, help=f"diffusion: {' or '.join(SAMPLERS)} (ancestral / deterministic); default {d['sampler']}")
    a("--noise_scale", type=float, default=None, help=f"diffusion: scales the ancestral noise (1 = the reverse process's; default {d['noise_scale']})")
    a("--score_temperature", type=float, default=None,
      help=f"diffusion: divides the predicted noise, < 1 sharpens every step (1 = the reverse process's; default {d['score_temperature']})")
    a("--spacing", default=None, help=f"diffusion: the steps evenly spaced in t or in log-SNR (t or log_snr; default {d['spacing']})")
    a("--clamp", action="store_const", const=True, default=None, help="diffusion: snap every x0 estimate to its nearest token embedding (Diffusion-LM)")
    a("--compile", action="store_const", const=True, default=None, help="diffusion: torch.compile the denoiser")
    if conditioning:
        a("--label", default=None, help="diffusion trained with --label_column: condition on this label (one of the "
          "column's values, stored in the checkpoint; an unknown one is an error that lists them)")
        a("--guidance", type=float, default=None, help="diffusion: classifier-free guidance weight w >= 0 on the label and "
          "the prompt / infill text: cond + w * (cond - uncond), one more network pass per step (default 0 = none)")
    a("--dtype", choices=DTYPES, default=None, help="bfloat16: bf16 autocast (the default on CUDA); float32 (the default elsewhere)")


def sampler_options(args, **more):
    """The add_sampler_args flags that were given, updated by more (e.g. num_steps; None = not given), as generate()
    options."""
    options = dict(sampler=args.sampler, noise_scale=args.noise_scale, score_temperature=args.score_temperature,
                   spacing=args.spacing, clamp=args.clamp, compile=args.compile, label=getattr(args, "label", None),
                   guidance=getattr(args, "guidance", None)) | more
    return {k: v for k, v in options.items() if v is not None}


def sampler_settings(model, temperature, options):
    """All of generate()'s options for a model (its own defaults: a distilled model's differ from its class's) or a
    model class, defaults filled in and checked: one UserError if not valid. For a model class (no model loaded yet),
    without the checks that need the model's config, such as its labels."""
    try:
        settings = model.sampler_settings(temperature, **{**model.sampler_defaults, **options})
        if not isinstance(model, type):
            model.check_settings(settings)
        return settings
    except ValueError as e:
        raise UserError(f"bad sampling settings: {e}") from None


def generate(model, num_samples, seq_len, known, temperature=1.0, batch_size=None, generator=None, bar=None, **options):
    """(num_samples, seq_len) token ids in batches of batch_size, from any model. known = {position: id} with BOS at
    0 (for a GPT it must be a prefix); the diffusion model also takes a sequence of num_samples ids for a position. bar: a tqdm bar advanced after every step (see progress_total)."""
    sampler_settings(model, temperature, options)
    try:
        model.check_known(seq_len, known)
    except ValueError as e:
        raise UserError(str(e)) from None
    batch_size = batch_size or num_samples
    callback = (lambda: bar.update(1)) if bar is not None else None
    batch = lambda start: {p: v if torch.as_tensor(v).dim() == 0 else v[start:start + batch_size] for p, v in known.items()}
    return torch.cat([model.generate(min(batch_size, num_samples - start), seq_len, batch(start), temperature, generator,
                                     callback, **options)
                      for start in range(0, num_samples, batch_size)])


def progress_total(model, num_samples, seq_len, known, batch_size=None, temperature=1.0, **options):
    """Steps of a generate() call for a progress bar: batches x the model's steps per batch."""
    settings = sampler_settings(model, temperature, options)
    return -(-num_samples // (batch_size or num_samples)) * model.progress_steps(seq_len, known, settings)
