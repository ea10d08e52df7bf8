"""
The autoregressive baseline: a GPT built from the diffusion model's own transformer blocks with a causal
mask, trained on next-token prediction. Same width rule, same RoPE / QK-norm / relu^2 blocks, so a
comparison at equal shape and compute isolates the modelling choice (diffusion vs next-token).
It computes exact bits per byte and generates with a KV cache; its checkpoints are the judge for
generative perplexity.
"""

from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.diffusion_roberta import Block, init_transformer_weights, norm, rotary_cos_sin


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    depth: int = 12
    head_dim: int = 64
    max_seq_len: int = 1024
    local_mix: int = 0  # K > 0: before every block, each position adds a learned depthwise mix of itself and its K - 1 predecessors

    def __post_init__(self):
        if self.depth < 1 or self.vocab_size < 2 or self.max_seq_len < 1:
            raise ValueError("sizes must be positive")
        if self.local_mix < 0:
            raise ValueError("local_mix must be 0 (off) or a kernel size >= 1")
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} must be a multiple of head_dim {self.head_dim}")

    @property
    def model_dim(self):
        return 64 * self.depth

    @property
    def n_head(self):
        return self.model_dim // self.head_dim

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown config fields {unknown} (a checkpoint from another version of the code?)")
        return cls(**d)


class KVCache:
    """Keys and values of one layer, grown as tokens are decoded, and the layer's last inputs for local mixing."""

    def __init__(self):
        self.k = self.v = self.recent = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.model_dim
        self.wte = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList([Block(d, config.n_head, causal=True) for _ in range(config.depth)])
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        # the diffusion model's local mixing made causal (Canon layers): zero-initialised, so the GPT starts plain
        self.local_mix = nn.Parameter(torch.zeros(config.depth, config.local_mix, d)) if config.local_mix else None
        cos, sin = rotary_cos_sin(config.max_seq_len, config.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_transformer_weights(self)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.zeros_(self.lm_head.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self):
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("wte."))

    def flops_per_token(self, seq_len=None):
        T = seq_len or self.config.max_seq_len
        return 6 * self.matmul_params() + 12 * self.config.depth * self.config.model_dim * T

    def param_groups(self):
        matrix = [p for n, p in self.named_parameters() if n.startswith("blocks.")]
        mix = [self.local_mix] if self.local_mix is not None else []
        return dict(matrix=matrix, embedding=[self.wte.weight], head=[self.lm_head.weight], other=[], mix=mix)

    def logits(self, idx, start=0, kv_caches=None):
        T = idx.size(1)
        cos_sin = (self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T])
        h = self.wte(idx)
        for i, block in enumerate(self.blocks):
            cache = None if kv_caches is None else kv_caches[i]
            if self.local_mix is not None:
                h = self.mix_predecessors(h, self.local_mix[i], cache)
            h = block(h, cos_sin, kv_cache=cache)
        return self.lm_head(norm(h)).float()

    @staticmethod
    def mix_predecessors(h, weight, cache=None):
        """h (B,T,d) plus a causal depthwise convolution over positions with weight (k, d): each position adds
        weight[j] * (its predecessor at distance k - 1 - j), zeros before the start. When decoding, the cache holds
        the last k - 1 inputs before h."""
        k, T = weight.size(0), h.size(1)
        fresh = cache is None or cache.recent is None
        padded = torch.cat([h.new_zeros(h.size(0), k - 1, h.size(2)) if fresh else cache.recent, h], dim=1)
        if cache is not None:
            cache.recent = padded[:, T:]
        return h + sum(padded[:, j:j + T] * weight[j].to(h.dtype) for j in range(k))

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

    @torch.no_grad()
    def generate(self, num_samples, seq_len, prompt, temperature=1.0, top_k=None, generator=None):
        """Sample (num_samples, seq_len) ids that start with `prompt` (at least one id, e.g. BOS)."""
        if not 1 <= len(prompt) <= seq_len <= self.config.max_seq_len:
            raise ValueError(f"need 1 <= len(prompt) <= seq_len <= {self.config.max_seq_len}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = self.wte.weight.device
        out = torch.tensor(prompt, device=device).repeat(num_samples, 1)
        caches = [KVCache() for _ in self.blocks]
        logits = self.logits(out, 0, caches)[:, -1]
        while out.size(1) < seq_len:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            logits = self.logits(nxt, out.size(1) - 1, caches)[:, -1]
        return out
