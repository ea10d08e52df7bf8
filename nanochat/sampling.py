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


def generate(model, model_type, num_samples, seq_len, known, num_steps=100, temperature=1.0, sampler="ddpm",
             clamp=False, batch_size=None, generator=None, bar=None):
    """(num_samples, seq_len) token ids in batches of batch_size. known = {position: id} with BOS at 0
    (for a GPT it must be a prefix). bar: a tqdm bar over batches x steps, advanced after every step."""
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
            out.append(model.generate(b, seq_len, num_steps, temperature=temperature, sampler=sampler, known=known,
                                      generator=generator, clamp=clamp, callback=step))
        if bar is not None:  # exact per batch, whatever the step count per call
            bar.update(done + bar_steps(model, model_type, seq_len, num_steps) - bar.n)
    return torch.cat(out)


def bar_steps(model, model_type, seq_len, num_steps):
    """Progress units per batch: denoising steps, num_steps per block (a GPT's batch counts as one unit)."""
    if model_type == "gpt":
        return 1
    return -(-seq_len // (model.config.block_size or seq_len)) * num_steps
