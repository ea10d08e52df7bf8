"""
The autoregressive baseline: a GPT built from the diffusion model's own transformer blocks with a causal
mask, trained on next-token prediction. Same width rule, same RoPE / QK-norm / relu^2 blocks, so a
comparison at equal shape and compute isolates the modelling choice (diffusion vs next-token).
It computes exact bits per byte and generates with a KV cache; its checkpoints are the judge for
generative perplexity.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.transformer import TokenTransformer, TransformerConfig, norm


@dataclass
class GPTConfig(TransformerConfig):
    pass


class KVCache:
    """Keys and values of one layer, grown as tokens are decoded."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class GPT(TokenTransformer):
    def __init__(self, config):
        super().__init__(config, causal=True, input_rows=config.vocab_size)

    def logits(self, idx, start=0, kv_caches=None):
        T = idx.size(1)
        cos_sin = (self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T])
        h = self.wte(idx)
        for i, block in enumerate(self.blocks):
            h = block(h, cos_sin, kv_cache=None if kv_caches is None else kv_caches[i])
        return self.lm_head(norm(h)).float()

    def forward(self, tokens):
        """Mean next-token cross-entropy over a (B, T) block: T - 1 predictions per row."""
        logits = self.logits(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    @torch.no_grad()
    def token_nll(self, tokens):
        """(exact nats per predicted token (B, T-1), the predicted ids): the bits-per-byte interface."""
        targets = tokens[:, 1:]
        nll = F.cross_entropy(self.logits(tokens[:, :-1]).flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view(targets.shape), targets

    def describe_sampler(self, settings):
        return "autoregressive"

    def progress_steps(self, seq_len, known, settings):
        """Calls of generate()'s callback: one per generated token."""
        return seq_len - len(known)

    can_infill = False  # it only continues a prefix

    @torch.no_grad()
    def generate(self, num_samples, seq_len, known=None, temperature=1.0, generator=None, callback=None, **options):
        """Sample (num_samples, seq_len) ids that continue the prompt known = {0: id, 1: id, ...} (at least one
        id, e.g. BOS), token by token with a KV cache. callback() runs after every token. There are no sampler
        options: any is an error."""
        self.sampler_settings(temperature, **options)
        known = self.check_known(seq_len, known)
        if not known or sorted(known) != list(range(len(known))):
            raise ValueError("a GPT continues a prompt: known must be {0: id, 1: id, ...} with at least one id (e.g. BOS)")
        device = self.wte.weight.device
        out = torch.tensor([known[i] for i in range(len(known))], device=device).repeat(num_samples, 1)
        caches = [KVCache() for _ in self.blocks]
        logits = self.logits(out, 0, caches)[:, -1]
        while out.size(1) < seq_len:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            if callback is not None:
                callback()
            if out.size(1) < seq_len:  # no forward pass after the last token
                logits = self.logits(nxt, out.size(1) - 1, caches)[:, -1]
        return out
