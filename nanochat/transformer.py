"""
The pieces every model here is built from: the shared config (shape, JSON round trip), the transformer (RoPE,
QK-norm attention, relu^2 MLP, pre-norm blocks with optional adaLN; the causal flag gives the autoregressive
baseline of nanochat/gpt.py), and LanguageModel, the interface that the scripts use for any model.
"""

import math
from dataclasses import dataclass, asdict, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


def knob(default, help):
    """A config field that is also a training flag (nanochat.common.add_config_args): its default and its help."""
    return field(default=default, metadata=dict(help=help))


@dataclass
class TransformerConfig:
    """The shape shared by every model here. Plain values only: it round-trips through JSON for checkpoints."""
    vocab_size: int = knob(65536, "vocabulary size (set from the tokenizer)")
    depth: int = knob(12, "transformer blocks; the width follows as model_dim = 64 * depth (nanochat's rule)")
    head_dim: int = knob(64, "attention head dimension")
    max_seq_len: int = knob(1024, "tokens per training row")

    def __post_init__(self):
        self.check([
            (self.depth >= 1 and self.vocab_size >= 2 and self.max_seq_len >= 1 and self.head_dim >= 1, "sizes must be positive"),
            (self.model_dim % self.head_dim == 0, f"model_dim {self.model_dim} must be a multiple of head_dim {self.head_dim}"),
        ])

    @staticmethod
    def check(conditions):
        for ok, message in conditions:
            if not ok:
                raise ValueError(message)

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
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**d)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm, as in nanochat


def rotary_cos_sin(seq_len, head_dim, base=10000.0, device=None):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, head_dim/2)


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim, n_head, causal):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos_sin, kv_cache=None, attn_mask=None):
        B, T, C = x.shape
        shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        cos, sin = cos_sin
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # RoPE, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:  # autoregressive decoding: attend to everything cached so far
            k, v = kv_cache.append(k, v)
        # a causal mask only matters when several queries arrive at once (training, or a prompt prefill)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and T > 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block. With `modulated`, a per-sequence condition vector sets a scale and a
    shift for both norms (adaLN); the modulation starts at zero, so the block starts as a plain one."""

    def __init__(self, dim, n_head, causal=False, modulated=False):
        super().__init__()
        self.attn = SelfAttention(dim, n_head, causal)
        self.mlp = MLP(dim)
        self.modulation = nn.Linear(dim, 4 * dim, bias=False) if modulated else None

    def forward(self, x, cos_sin, cond=None, kv_cache=None, attn_mask=None):
        if self.modulation is None:
            x = x + self.attn(norm(x), cos_sin, kv_cache, attn_mask)
            return x + self.mlp(norm(x))
        scale1, shift1, scale2, shift2 = self.modulation(cond)[:, None, :].chunk(4, dim=-1)
        x = x + self.attn(norm(x) * (1 + scale1) + shift1, cos_sin, attn_mask=attn_mask)
        return x + self.mlp(norm(x) * (1 + scale2) + shift2)


def init_transformer_weights(module):
    """nanochat-style init: fan-in scaled normal for linears, zeros for the residual output projections."""
    for name, p in module.named_parameters():
        if p.dim() == 2 and name.endswith(("c_proj.weight", "modulation.weight")):
            nn.init.zeros_(p)
        elif p.dim() == 2:
            nn.init.normal_(p, std=p.size(1) ** -0.5)


class LanguageModel(nn.Module):
    """What every model here offers the scripts, which never ask which model they hold: forward(tokens) (the
    training loss), token_nll(tokens) (nats per predicted token: exact, or a bound; nll_kind says which),
    flops_per_token(seq_len), param_groups() (for nanochat.optim.setup_optimizers, with the model's own
    learning_rates), and generate(num_samples, seq_len, known, temperature, generator, callback, **options) with
    the options of sampler_defaults."""
    nll_kind = "exact"
    learning_rates = {}
    sampler_defaults = {}  # an instance may have its own (a distilled diffusion model's)

    def __init__(self, config):
        super().__init__()
        self.config = config
        # RoPE tables: derived, not saved, and (re)computed by init_weights() like the weights
        shape = (1, config.max_seq_len, 1, config.head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(shape), persistent=False)

    @classmethod
    def build(cls, config, device):
        """The model with its weights initialised on device, never allocated anywhere else (built on the meta
        device, then materialised): the same weights as cls(config) with the same seed, on the CPU."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self):
        """Every weight and buffer from the global RNG (the subclasses add their own parameters' rules)."""
        cos, sin = rotary_cos_sin(self.config.max_seq_len, self.config.head_dim, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        init_transformer_weights(self)

    def fit_unigram_prior(self, batches):
        """Statistics that a model takes from the training data before it trains: none here (batches, an iterator of
        (B, T) training tokens, is left unread)."""

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def sampler_settings(cls, temperature=1.0, **options):
        """sampler_defaults updated by options, checked (ValueError names what is wrong)."""
        unknown = sorted(set(options) - set(cls.sampler_defaults))
        if unknown:
            raise ValueError(f"{cls.__name__} has no sampler option {', '.join(unknown)}")
        settings = {**cls.sampler_defaults, **options}
        cls.check_sampler(temperature, settings)
        return settings

    @classmethod
    def check_sampler(cls, temperature, settings):
        TransformerConfig.check([(0 < temperature < math.inf, f"temperature must be finite and > 0, got {temperature}")])

    def check_settings(self, settings):
        """The checks of sampler settings that need the model itself (ValueError); none by default."""

    def check_known(self, seq_len, known):
        """known {position: token id, or one per sample} (None: nothing known) checked against seq_len and the model."""
        known = dict(known or {})
        ids = [int(w) for v in known.values() for w in torch.as_tensor(v).flatten()]
        TransformerConfig.check([
            (1 <= seq_len <= self.config.max_seq_len, f"seq_len must be in [1, {self.config.max_seq_len}] (the model's max_seq_len), got {seq_len}"),
            (all(0 <= p < seq_len for p in known), f"prompt / known positions must lie inside seq_len={seq_len}"),
            (all(0 <= w < self.config.vocab_size for w in ids), "prompt / known token ids must be < vocab_size"),
        ])
        return known


class TokenTransformer(LanguageModel):
    """A token table, the blocks and a head over the vocabulary: the GPT (causal) and the masked diffusion model
    (bidirectional, one more input row for [MASK]) share this body and its bookkeeping."""

    def __init__(self, config, causal, input_rows):
        super().__init__(config)
        rng = torch.get_rng_state()  # the modules' default init must not shift the seeded draws of init_weights()
        d = config.model_dim
        self.wte = nn.Embedding(input_rows, d)
        self.blocks = nn.ModuleList([Block(d, config.n_head, causal=causal) for _ in range(config.depth)])
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        torch.set_rng_state(rng)
        self.init_weights()

    def init_weights(self):
        super().init_weights()
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.zeros_(self.lm_head.weight)

    def matmul_params(self):
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("wte."))

    def flops_per_token(self, seq_len=None):
        """6N (N the matrices, head included) plus attention over every position pair."""
        T = seq_len or self.config.max_seq_len
        return 6 * self.matmul_params() + 12 * self.config.depth * self.config.model_dim * T

    def param_groups(self):
        matrix = [p for n, p in self.named_parameters() if n.startswith("blocks.")]
        return dict(matrix=matrix, embedding=[self.wte.weight], head=[self.lm_head.weight], other=[], mix=[])
