"""
A continuous (embedding-space) diffusion language model with a RoBERTa-style bidirectional transformer.

Reading order, top to bottom:
1. DiffusionConfig: every knob, plain values only (round-trips through JSON for checkpoints).
2. The transformer pieces (RoPE, QK-norm attention, relu^2 MLP, pre-norm blocks with optional adaLN).
   The causal flag lets nanochat/gpt.py build an autoregressive baseline from the very same blocks.
3. Noise schedules: alpha_bar(t) for cosine / linear / sqrt, and NoiseSchedule, which maps t in [0, 1]
   to gamma = -log SNR, truncated to [gamma_min, gamma_max]. All schedule arithmetic is float64.
4. DiffusionRoBERTa: the denoiser, the training loss (objectives `logits`, `x0`, `eps`), the samplers
   (ancestral DDPM, deterministic DDIM) and the continuous-time likelihood bound (VDM / Plaid).

Notation (variance preserving): z_t = alpha_t * x + sigma_t * eps, alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t), where x is the (unit-norm, sqrt(embed_dim)-scaled) token embedding.
"""

import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES = ("logits", "x0", "eps")
SCHEDULES = ("cosine", "linear", "sqrt")
SAMPLERS = ("ddpm", "ddim")
# generate()'s defaults, the sampler that scored best against the GPT (DIFFUSION_README, "Measured comparison"): noise
# at 0.85 of the reverse process's and a score temperature of 0.9. Both at 1 give the model's own reverse process.
NOISE_SCALE, SCORE_TEMPERATURE = 0.85, 0.9
TIME_CONDS = ("adaln", "add")
WARP_BINS, WARP_FLOOR, WARP_DECAY = 32, 0.2, 0.99  # time warp: t bins, share of uniform sampling, decay per step


@dataclass
class DiffusionConfig:
    vocab_size: int = 65536
    depth: int = 12  # number of blocks; the width follows as model_dim = 64 * depth (nanochat's rule)
    head_dim: int = 64
    max_seq_len: int = 1024
    embed_dim: int = 64  # dimension of the space the diffusion runs in (low-dimensional, DESIGN.md §3.2)
    objective: str = "logits"  # logits: CE on clean tokens | x0: MSE on x0 + rounding CE | eps: MSE on noise + rounding CE
    schedule: str = "cosine"  # shape of gamma(t): where training spends its timesteps and how the sampler steps
    gamma_min: float = -3.0  # log-SNR truncation: gamma = -log SNR runs from gamma_min (t=0) to gamma_max (t=1)
    gamma_max: float = 6.0
    time_cond: str = "adaln"  # how the noise level reaches the blocks: adaln (scale/shift of every norm) | add
    self_cond: bool = True  # feed the previous estimate of x0 back in (Chen et al., Analog Bits)
    self_cond_rate: float = 0.5  # fraction of training micro-batches that get a self-conditioning first pass
    cond_rate: float = 0.25  # fraction of training rows with clean prefix / infill tokens (DiffuSeq partial noising)
    token_noise_rate: float = 0.0  # fraction of training rows whose tokens get independent noise levels (needs time_cond add)
    bound_samples: int = 32  # timesteps (stratified) per sequence when evaluating the likelihood bound
    elbo_weight: float = 1.0  # add this times the ELBO-weighted MSE (the bound's diffusion term) to the training loss
    posterior_skip: bool = True  # logits objective: add the exact per-token Gaussian posterior log p(w | z_t) to the logits
    posterior_input: bool = False  # feed the network p(w | z_t) @ W_in, a soft lookup in a full V x d input table
    time_warp: bool = False  # sample training timesteps where the cross-entropy changes fastest (CDCD's learned time warping)
    block_size: int = 0  # 0: diffuse the whole sequence at once | K: block diffusion, blocks of K tokens given the clean blocks before
    local_mix: int = 3  # K > 0 (odd): before every block, each position adds a learned depthwise mix of its K-neighbourhood

    def __post_init__(self):
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.time_cond in TIME_CONDS, f"time_cond must be one of {TIME_CONDS}, got {self.time_cond!r}"),
            (self.depth >= 1 and self.vocab_size >= 2 and self.max_seq_len >= 1 and self.embed_dim >= 1, "sizes must be positive"),
            (self.model_dim % self.head_dim == 0, f"model_dim {self.model_dim} must be a multiple of head_dim {self.head_dim}"),
            (self.gamma_min < self.gamma_max, "gamma_min must be below gamma_max"),
            (all(0 <= r <= 1 for r in (self.self_cond_rate, self.cond_rate, self.token_noise_rate)), "rates must lie in [0, 1]"),
            (self.token_noise_rate == 0 or self.time_cond == "add", "token_noise_rate > 0 needs time_cond 'add' (a noise level per token)"),
            (self.bound_samples >= 1, "bound_samples must be >= 1"),
            (self.elbo_weight >= 0, "elbo_weight must be >= 0"),
            (self.block_size >= 0, "block_size must be >= 0 (0 = the whole sequence)"),
            (self.local_mix == 0 or self.local_mix > 0 and self.local_mix % 2 == 1, "local_mix must be 0 (off) or an odd kernel size"),
            (self.block_size == 0 or not (self.posterior_input or self.token_noise_rate > 0),
             "block_size > 0 gives the network clean context already; it does not combine with posterior_input or token_noise_rate"),
        ]
        for ok, message in checks:
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
        known = {f.name for f in fields(cls)}
        d = {"local_mix": 0, **d}  # checkpoints from before local_mix existed were trained without it
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown} (a checkpoint from another version of the code?)")
        return cls(**d)


# -----------------------------------------------------------------------------
# Transformer pieces, shared with the autoregressive baseline (nanochat/gpt.py)

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


# -----------------------------------------------------------------------------
# Noise schedules (float64 throughout)

def alpha_bar(schedule, t):
    """Signal level alpha_bar(t) = alpha_t^2 for t in [0, 1], clipped to [1e-4, 1 - 1e-6]. With t = step / 1000
    these are the familiar discrete 1000-step schedules: cosine (Nichol & Dhariwal 2021), linear betas
    1e-4..0.02 (Ho et al. 2020) and sqrt (Li et al. 2022, Diffusion-LM)."""
    t = t.double()
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    elif schedule == "linear":
        beta0, beta1, steps = 1e-4, 0.02, 1000
        f = torch.exp(-steps * (beta0 * t + 0.5 * (beta1 - beta0) * t**2))
    elif schedule == "sqrt":
        f = 1 - torch.sqrt(t + 1e-4)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return f.clamp(1e-4, 1 - 1e-6)


class NoiseSchedule:
    """gamma(t) = -log SNR along the named schedule's shape, with t rescaled so that gamma(0) = gamma_min and
    gamma(1) = gamma_max (the schedule's own range bounds the truncation if it is narrower)."""

    def __init__(self, name, gamma_min, gamma_max):
        self.name = name
        self.t_lo = self._solve(gamma_min)
        self.t_hi = self._solve(gamma_max)

    def _raw_gamma(self, t):
        ab = alpha_bar(self.name, t)
        return torch.log1p(-ab) - torch.log(ab)

    def _solve(self, target):
        lo, hi = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        for _ in range(100):  # gamma is increasing in t: bisection
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._raw_gamma(mid) < target else (lo, mid)
        return lo.item()

    @torch.compiler.disable
    def gamma(self, t):
        return self._raw_gamma(self.t_lo + t.double() * (self.t_hi - self.t_lo))

    @torch.compiler.disable
    def gamma_and_slope(self, t):
        """gamma(t) and d gamma / dt (by autograd, float64), for the likelihood bound's weighting."""
        with torch.enable_grad():
            t = t.detach().double().requires_grad_(True)
            g = self.gamma(t)
            (slope,) = torch.autograd.grad(g.sum(), t)
        return g.detach(), slope


def alpha_sigma(gamma):
    """(alpha, sigma) from gamma = -log SNR, computed in float64."""
    gamma = gamma.double()
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def per_row(v, like):
    """A float64 schedule quantity per row (B,) or per token (B, T) (kept on the CPU: MPS has no float64) as a
    float32 (B, 1, 1) or (B, T, 1) tensor on like's device, ready to broadcast over (B, T, e)."""
    v = v.float().to(like.device)
    return v[:, None, None] if v.dim() == 1 else v[..., None]


def timestep_features(x, dim=256, max_period=10000.0):
    """Sinusoidal features of a scalar per row (B,) or per token (B, T) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def block_attention_mask(noisy_pos, clean_pos, block_size):
    """Boolean (Tn + Tc, Tn + Tc) mask (True = may attend) for block diffusion (BD3-LM, Arriola et al. 2025) over a
    noisy stream (positions noisy_pos) followed by a clean stream (clean_pos): a noisy token sees its own block's
    noisy tokens and the clean tokens of earlier blocks; a clean token sees the clean tokens of its block and
    earlier ones (what it will be as context for later blocks), never the noise."""
    bn, bc = noisy_pos // block_size, clean_pos // block_size
    noisy_rows = torch.cat([bn[:, None] == bn[None, :], bc[None, :] < bn[:, None]], dim=1)
    clean_rows = torch.cat([torch.zeros(len(bc), len(bn), dtype=torch.bool, device=bc.device), bc[None, :] <= bc[:, None]], dim=1)
    return torch.cat([noisy_rows, clean_rows], dim=0)


# -----------------------------------------------------------------------------
# The diffusion model

class DiffusionRoBERTa(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, e = config.model_dim, config.embed_dim
        self.schedule = NoiseSchedule(config.schedule, config.gamma_min, config.gamma_max)
        self.embedding = nn.Embedding(config.vocab_size, e)  # normalised in embed_matrix(): no collapse, no blow-up
        self.in_proj = nn.Linear(e, d, bias=False)
        # input embeddings with a GPT's capacity (V x d), looked up softly by each token's posterior (Bayesian flow networks)
        self.input_embedding = nn.Embedding(config.vocab_size, d) if config.posterior_input else None
        # block diffusion's clean stream: known token ids, looked up as a GPT looks up its input (V x d)
        self.context_embedding = nn.Embedding(config.vocab_size, d) if config.block_size else None
        self.self_cond_proj = nn.Linear(e, d, bias=False)  # zero-init: self-conditioning starts as a no-op
        self.known_embed = nn.Parameter(torch.zeros(d))  # marks clean (prompt / infill) positions
        self.time_mlp = nn.Sequential(nn.Linear(256, d, bias=False), nn.SiLU(), nn.Linear(d, d, bias=False))
        modulated = config.time_cond == "adaln"
        self.blocks = nn.ModuleList([Block(d, config.n_head, causal=False, modulated=modulated) for _ in range(config.depth)])
        # zero-init depthwise convolutions over positions: neighbours' evidence reaches every position without first
        # learning to attend to it (Canon layers, Allen-Zhu 2025), as the current token reaches a GPT's prediction
        self.local_mix = nn.Parameter(torch.zeros(config.depth, config.local_mix, d)) if config.local_mix else None
        self.head = nn.Linear(d, config.vocab_size if config.objective == "logits" else e, bias=False)
        cos, sin = rotary_cos_sin(config.max_seq_len, config.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if config.time_warp:  # decayed CE sums and counts per t bin; they travel with the weights (checkpoints, resume)
            prior = torch.linspace(0, math.log(config.vocab_size), WARP_BINS + 1)[1:]  # float32: MPS has no float64
            self.register_buffer("warp_sums", torch.stack([prior, torch.ones_like(prior)]))  # one pseudo-token per bin
            # CE sums and counts since the last update, on the model's device (no host copy per micro-batch)
            self.register_buffer("warp_stats", torch.zeros(2, WARP_BINS), persistent=False)
        self.init_weights()

    def init_weights(self):
        init_transformer_weights(self)
        nn.init.normal_(self.embedding.weight, std=1.0)
        for table in (self.input_embedding, self.context_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=1.0)
        nn.init.zeros_(self.self_cond_proj.weight)
        nn.init.zeros_(self.head.weight)
        if self.local_mix is not None:
            nn.init.zeros_(self.local_mix)

    # --- bookkeeping -------------------------------------------------------

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self):
        """Parameters that cost 2 FLOPs per token in the forward pass (not the embedding lookup, and not the
        time MLP / adaLN, which run once per sequence)."""
        per_sequence = {"embedding", "input_embedding", "context_embedding", "time_mlp", "modulation", "known_embed"}
        return sum(p.numel() for n, p in self.named_parameters() if not per_sequence & set(n.split(".")))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: forward + backward (6N + attention), plus the expected no-grad
        self-conditioning forward pass (2N + attention forward) on self_cond_rate of the micro-batches.
        N counts the products with the embedding matrix too (softmax @ E, and z @ E^T for the skip), and, for block
        diffusion, the clean stream's share of the network."""
        c = self.config
        T = seq_len or c.max_seq_len
        n = self.matmul_params()
        clean = self.clean_length(T) / T  # block diffusion: the clean stream runs through the network but not the head
        n += clean * (n - self.head.weight.numel())
        if c.posterior_skip or c.posterior_input:  # the evidence z @ E^T
            n += c.vocab_size * c.embed_dim
        if c.posterior_input:  # p(w | z_t) @ W_in
            n += c.vocab_size * c.model_dim
        if c.objective == "logits":  # softmax(logits) @ E
            n += c.vocab_size * c.embed_dim
        attn = 4 * c.depth * c.model_dim * T * (1 + clean) ** 2
        flops = 6 * n + 3 * attn
        if c.self_cond:
            flops += c.self_cond_rate * (2 * n + attn)
        return flops

    def param_groups(self):
        """Hidden matrices go to Muon; embeddings, head, local mixing, projections and scalars go to AdamW."""
        matrix = [p for n, p in self.named_parameters() if n.startswith("blocks.") and ".modulation." not in n]
        embedding = [t.weight for t in (self.embedding, self.input_embedding, self.context_embedding) if t is not None]
        head = [self.head.weight]
        mix = [self.local_mix] if self.local_mix is not None else []
        taken = {id(p) for p in matrix + embedding + head + mix}
        other = [p for p in self.parameters() if id(p) not in taken]
        return dict(matrix=matrix, embedding=embedding, head=head, other=other, mix=mix)

    # --- the denoiser ------------------------------------------------------

    def embed_matrix(self):
        """Token embeddings on a sphere of radius sqrt(embed_dim): unit variance per coordinate."""
        return F.normalize(self.embedding.weight.float(), dim=-1) * math.sqrt(self.config.embed_dim)

    def denoise(self, z, gamma, known, x0_self_cond, posterior=None, context=None, offset=0):
        """One network evaluation: noisy embeddings z (B,T,e) at positions offset.. offset+T-1, noise level gamma (B,)
        or (B,T), clean-position mask known (B,T), the previous x0 estimate (B,T,e), each token's posterior p(w | z_t)
        (B,T,V) when posterior_input -> head output (B,T,vocab or e). Block diffusion: context (B,S) holds the clean
        token ids of positions 0..S-1, a second stream that each noisy block sees up to its own start."""
        T = z.size(1)
        h = self.in_proj(z) + self.self_cond_proj(x0_self_cond) + known[..., None] * self.known_embed
        if self.input_embedding is not None:
            h = h + posterior.to(h.dtype) @ self.input_embedding.weight.to(h.dtype)
        positions, attn_mask = torch.arange(offset, offset + T, device=z.device), None
        if context is not None:
            h = torch.cat([h, self.context_embedding(context).to(h.dtype)], dim=1)
            clean = torch.arange(context.size(1), device=z.device)
            attn_mask = block_attention_mask(positions, clean, self.config.block_size)
            positions = torch.cat([positions, clean])
        # normalise gamma to [0, 1000] so that the usual sinusoid frequencies resolve it
        g = (gamma.float().to(z.device) - self.config.gamma_min) / (self.config.gamma_max - self.config.gamma_min) * 1000
        cond = self.time_mlp(timestep_features(g).to(h.dtype))
        if self.config.time_cond == "add":
            h, cond = h + (cond[:, None, :] if cond.dim() == 2 else cond), None
        else:
            cond = F.silu(cond)
        cos_sin = (self.rope_cos[:, positions], self.rope_sin[:, positions])
        for i, block in enumerate(self.blocks):
            if self.local_mix is not None:  # the noisy stream only: the clean one already sees its block in full
                h = torch.cat([self.mix_neighbours(h[:, :T], self.local_mix[i], offset), h[:, T:]], dim=1)
            h = block(h, cos_sin, cond, attn_mask=attn_mask)
        return self.head(norm(h[:, :T]))

    def mix_neighbours(self, h, weight, offset):
        """h (B,T,d) at positions offset.. plus a depthwise convolution over positions with weight (k, d): each
        position adds weight[j] * (its neighbour at distance j - k // 2), never across a block boundary (block
        diffusion) or past the ends of h."""
        T, r = h.size(1), weight.size(0) // 2
        index = torch.arange(T, device=h.device)
        K = self.config.block_size
        block = (index + offset) // K if K else torch.zeros_like(index)
        out = h
        for j in range(weight.size(0)):
            source = (index + j - r).clamp(0, T - 1)
            same = (index + j - r == source) & (block[source] == block)
            out = out + h[:, source] * (weight[j] * same[:, None]).to(h.dtype)
        return out

    def token_evidence(self, z, gamma, known, E):
        """log p(w | z_t) of each token seen alone, (B,T,V): alpha / sigma^2 * z . e_w (+ a constant, as all e_w
        share a norm). Clean (known) positions get a sharp posterior: their z is exactly their embedding."""
        alpha, sigma = alpha_sigma(gamma)
        scale = torch.where(known[..., None], 100.0, per_row(alpha / sigma**2, z))
        return (scale * z.float()) @ E.t()  # scaled in e dims, not V: cheaper

    def predict_x0(self, z, gamma, known, x0_self_cond, temperature=1.0, context=None, offset=0):
        """Denoise and express the result as (x0_hat (B,T,e), logits (B,T,V)), whatever the objective."""
        c, E = self.config, self.embed_matrix()
        evidence = self.token_evidence(z, gamma, known, E) if c.posterior_skip or c.posterior_input else None
        posterior = torch.softmax(evidence, dim=-1) if c.posterior_input else None
        out = self.denoise(z, gamma, known, x0_self_cond, posterior, context, offset).float()
        if c.objective == "logits":
            if c.posterior_skip:  # the network only has to learn what context adds; at low noise the skip identifies the token
                out = out + evidence
            logits = out if temperature == 1 else out / temperature
            return torch.softmax(logits, dim=-1) @ E, logits  # score interpolation (CDCD, Plaid)
        if c.objective == "x0":
            x0 = out
        else:  # eps: invert z = alpha x + sigma eps
            alpha, sigma = (per_row(a, z) for a in alpha_sigma(gamma))
            x0 = (z - sigma * out) / alpha
        return x0, (x0 @ E.t()) / temperature  # all embeddings share a norm: dot product ranks by distance

    # --- training ----------------------------------------------------------

    def sample_t(self, batch_size, seq_len):
        """Training timesteps and their density relative to uniform (for the ELBO term's importance weight).
        Stratified: one per stratum, shuffled across rows (low-variance estimates), (B,). With token_noise_rate > 0,
        (B, T): that fraction of the rows get an independent timestep per token (as in Diffusion Forcing), so that the
        network also sees targets whose context is cleaner than they are: the signal a masked or autoregressive LM
        learns language from. With time_warp, u in [0, 1) is mapped through the learned warp (see warp_density)."""
        u = torch.rand((), dtype=torch.float64)
        strata = torch.randperm(batch_size).double()
        u = (strata + u) / batch_size
        if self.config.token_noise_rate > 0:
            independent = torch.rand(batch_size, 1) < self.config.token_noise_rate
            u = torch.where(independent, torch.rand(batch_size, seq_len, dtype=torch.float64), u[:, None])
        if not self.config.time_warp:
            return u, torch.ones_like(u)
        q = self.warp_density()
        cdf = torch.cumsum(q, 0)
        k = torch.searchsorted(cdf, u, right=True).clamp(max=WARP_BINS - 1)
        start = cdf[k] - q[k]
        t = (k + ((u - start) / q[k]).clamp(0, 1)) / WARP_BINS
        return t, q[k] * WARP_BINS

    def warp_density(self):
        """(WARP_BINS,) probabilities of the t bins: in proportion to how much the mean training cross-entropy grows
        across each bin (a histogram of CDCD's learned warp: the steps go where the loss changes with the noise level,
        not where the skip alone identifies every token or where nothing is left to see), mixed with WARP_FLOOR of
        uniform so that every noise level keeps being trained. Uniform until the first update."""
        sums = self.warp_sums.double().cpu()
        curve = torch.cummax(sums[0] / sums[1], 0).values
        growth = torch.diff(curve, prepend=curve.new_zeros(1))
        return (1 - WARP_FLOOR) * growth / growth.sum() + WARP_FLOOR / WARP_BINS

    @torch.compiler.disable
    def record_warp(self, t, ce, noised):
        """Add the cross-entropies (B, T) of the noised tokens, at their timesteps t (B,) or (B, T), to warp_stats."""
        t = (t if t.dim() == 2 else t[:, None]).to(noised.device)
        bins = (t * WARP_BINS).long().clamp(max=WARP_BINS - 1).expand_as(noised)[noised]
        self.warp_stats[0].index_add_(0, bins, ce.detach().float()[noised])
        self.warp_stats[1].index_add_(0, bins, torch.ones_like(bins, dtype=torch.float32))

    def update_time_warp(self):
        """Fold warp_stats (summed over micro-batches, and over ranks by the training loop, so that every rank makes
        the same update) into the decayed sums, then clear them."""
        self.warp_sums.mul_(WARP_DECAY).add_(self.warp_stats)
        self.warp_stats.zero_()

    def sample_known(self, batch_size, seq_len, device):
        """Clean positions for conditional training: on cond_rate of the rows, either a prefix (prompt
        completion, up to half the row) or everything outside a gap of at least half the row (infilling).
        None when evaluating: the loss and the bound are about unconditional generation."""
        if not self.training or self.config.cond_rate == 0:
            return torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
        pos = torch.arange(seq_len, device=device)[None, :]
        r = torch.rand(batch_size, 4, device=device)
        prefix_len = (1 + r[:, 0] * (seq_len // 2)).long()[:, None]
        gap_len = (seq_len - seq_len // 2 + r[:, 1] * (seq_len // 2 + 1)).long().clamp(max=seq_len)[:, None]
        gap_start = (r[:, 2:3] * (seq_len - gap_len + 1)).long()
        prefix = pos < prefix_len
        infill = (pos < gap_start) | (pos >= gap_start + gap_len)
        use_prefix = (r[:, 3] < 0.5)[:, None]
        conditioned = (torch.rand(batch_size, device=device) < self.config.cond_rate)[:, None]
        return conditioned & torch.where(use_prefix, prefix, infill)

    def noised(self, x, gamma, known):
        alpha, sigma = (per_row(a, x) for a in alpha_sigma(gamma))
        eps = torch.randn_like(x)
        z = torch.where(known[..., None], x, alpha * x + sigma * eps)
        return z, eps

    def self_condition(self, z, gamma, known, x, context=None):
        """The self-conditioning input: zeros, or a no-grad first estimate of x0 on self_cond_rate of the calls
        (training), always when evaluating. Clean positions carry their true embedding."""
        x0_sc = torch.zeros_like(z)
        if self.config.self_cond and (not self.training or torch.rand(()) < self.config.self_cond_rate):
            with torch.no_grad():
                x0_sc = self.predict_x0(z, gamma, known, x0_sc, context=context)[0]
        return torch.where(known[..., None], x, x0_sc)

    def clean_length(self, seq_len):
        """Length of block diffusion's clean stream for whole sequences: the positions before the last block (no
        block sees its own or later clean tokens); 0 for whole-sequence diffusion."""
        K = self.config.block_size
        return (seq_len - 1) // K * K if K else 0

    def clean_context(self, tokens):
        """Block diffusion's clean stream (ids) for whole (B,T) sequences; None for whole-sequence diffusion."""
        return tokens[:, : self.clean_length(tokens.size(1))] if self.config.block_size else None

    def forward(self, tokens):
        """The training loss (a scalar) for a (B, T) batch of token ids."""
        B, T = tokens.shape
        x = F.embedding(tokens, self.embed_matrix())
        t, density = self.sample_t(B, T)
        gamma, slope = self.schedule.gamma_and_slope(t)
        known = self.sample_known(B, T, tokens.device)
        z, eps = self.noised(x, gamma, known)
        context = self.clean_context(tokens)
        x0_hat, logits = self.predict_x0(z, gamma, known, self.self_condition(z, gamma, known, x, context), context=context)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(B, T)
        noised = ~known
        if self.config.time_warp and self.training:
            self.record_warp(t, loss, noised)
        if self.config.elbo_weight > 0:  # the per-token diffusion term of nll_bound at this timestep, importance-weighted
            weight = per_row(0.5 * slope * torch.exp(-gamma) / density, x)[..., 0]
            loss = loss + self.config.elbo_weight * weight * (x - x0_hat).square().sum(-1)
        if self.config.objective == "x0":  # MSE on the regression target, plus the rounding CE above
            loss = loss + (x0_hat - x).square().mean(-1)
        elif self.config.objective == "eps":
            alpha, sigma = (per_row(a, z) for a in alpha_sigma(gamma))
            loss = loss + ((z - alpha * x0_hat) / sigma - eps).square().mean(-1)
        return (loss * noised).sum() / noised.sum().clamp(min=1)

    # --- the likelihood bound ----------------------------------------------

    @torch.no_grad()
    def nll_bound(self, tokens, num_t=None):
        """Per-token upper bound on -log p(tokens) in nats, (B, T): the continuous-time variational bound
        (Kingma et al. 2021, VDM; Gulrajani & Hashimoto 2023, Plaid) = prior + reconstruction + diffusion.
        Evaluated at temperature 1, without clamping, with num_t stratified timesteps per row."""
        c = self.config
        K = num_t or c.bound_samples
        B, T = tokens.shape
        E = self.embed_matrix()
        x = F.embedding(tokens, E)
        no_known = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        g0, g1 = (torch.tensor(g, dtype=torch.float64) for g in (c.gamma_min, c.gamma_max))
        # prior: KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)), summed over the embedding dimensions
        a1sq, s1sq = torch.sigmoid(-g1).item(), torch.sigmoid(g1).item()
        prior = 0.5 * (a1sq * x.square().sum(-1) + c.embed_dim * (s1sq - 1 - math.log(s1sq)))
        # reconstruction: -log p(w | z_0) under the exact Gaussian posterior over the vocabulary
        a0, s0 = (v.item() for v in alpha_sigma(g0))
        z0 = a0 * x + s0 * torch.randn_like(x)
        recon = F.cross_entropy((z0 @ E.t() * (a0 / s0**2)).flatten(0, 1), tokens.flatten(), reduction="none").view(B, T)
        # diffusion: 1/2 E_t[gamma'(t) exp(-gamma(t)) ||x - x0_hat(z_t)||^2]; with blocks, each block's term is
        # conditioned on the clean blocks before it, and the chain rule sums them (one shared t per row)
        u = torch.rand(B, dtype=torch.float64)
        diffusion = torch.zeros(B, T, device=tokens.device)
        context = self.clean_context(tokens)
        for k in range(K):
            gamma, slope = self.schedule.gamma_and_slope((u + k) / K)
            z, _ = self.noised(x, gamma, no_known)
            x0_hat, _ = self.predict_x0(z, gamma, no_known, self.self_condition(z, gamma, no_known, x, context), context=context)
            weight = per_row(0.5 * slope * torch.exp(-gamma), x)[..., 0]
            diffusion += weight * (x - x0_hat).square().sum(-1)
        return prior + recon + diffusion / K

    def token_nll(self, tokens):
        """(nats per target token, target ids), the interface shared with the GPT for bits per byte."""
        return self.nll_bound(tokens), tokens

    # --- sampling ----------------------------------------------------------

    @torch.no_grad()
    def generate(self, num_samples, seq_len, num_steps, temperature=1.0, sampler="ddpm", prompt=None, known=None,
                 generator=None, clamp=False, noise_scale=NOISE_SCALE, score_temperature=SCORE_TEMPERATURE,
                 return_trajectory=False, callback=None):
        """Denoise from pure noise in num_steps steps -> (num_samples, seq_len) token ids.
        prompt: token ids that appear unchanged at the start; known: {position: token id} that appear
        unchanged (infilling). temperature divides the logits and scales the ancestral noise; noise_scale scales
        that noise further (ddpm); score_temperature divides the predicted noise, which sharpens every step
        towards the denoised estimate (Plaid's score temperature); clamp snaps each x0 estimate to its nearest
        token embedding (Diffusion-LM). With return_trajectory, also returns
        the list of argmax token estimates after every step. callback(step) runs after every step (progress bars).
        With block_size K, the blocks of K tokens are generated left to right, num_steps each, every block given
        the clean tokens before it (semi-autoregressive, as in SSD-LM and BD3-LM)."""
        c = self.config
        known = dict(known or {})
        known.update(enumerate(prompt or []))
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not temperature > 0 or not score_temperature > 0:
            raise ValueError(f"temperature and score_temperature must be > 0, got {temperature} and {score_temperature}")
        if not noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= seq_len <= c.max_seq_len:
            raise ValueError(f"seq_len must be in [1, {c.max_seq_len}] (the model's max_seq_len), got {seq_len}")
        if any(not 0 <= p < seq_len for p in known):
            raise ValueError(f"prompt / known positions must lie inside seq_len={seq_len}")
        if any(not 0 <= w < c.vocab_size for w in known.values()):
            raise ValueError("prompt / known token ids must be < vocab_size")
        device = self.embedding.weight.device
        B, E = num_samples, self.embed_matrix()
        known_mask = torch.zeros(B, seq_len, dtype=torch.bool, device=device)
        known_ids = torch.zeros(B, seq_len, dtype=torch.long, device=device)
        for pos, tok in known.items():
            known_mask[:, pos], known_ids[:, pos] = True, tok
        x_known = F.embedding(known_ids, E)
        gammas = self.schedule.gamma(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64))
        tokens, trajectory = known_ids.clone(), []
        K = c.block_size or seq_len  # whole-sequence diffusion is one block
        for start in range(0, seq_len, K):  # block diffusion: each block given the clean tokens decided before it
            end = min(start + K, seq_len)
            mask, ids, xk = known_mask[:, start:end], known_ids[:, start:end], x_known[:, start:end]
            context = tokens[:, :start] if c.block_size else None
            z = torch.randn(B, end - start, c.embed_dim, device=device, generator=generator)
            x0_sc = torch.zeros_like(z)
            for i in range(num_steps):
                z = torch.where(mask[..., None], xk, z)
                gamma = gammas[i].expand(B)
                x0_hat, logits = self.predict_x0(z, gamma, mask, x0_sc if c.self_cond else torch.zeros_like(z),
                                                 temperature, context, start)
                if clamp:
                    x0_hat = F.embedding(logits.argmax(-1), E)
                x0_hat = torch.where(mask[..., None], xk, x0_hat)
                x0_sc = x0_hat
                z = self._step(z, x0_hat, gammas[i], gammas[i + 1], sampler, temperature * noise_scale,
                               score_temperature, generator)
                if return_trajectory:
                    trajectory.append(torch.cat([tokens[:, :start], torch.where(mask, ids, logits.argmax(-1))], dim=1))
                if callback is not None:
                    callback(start // K * num_steps + i)
            tokens[:, start:end] = torch.where(mask, ids, logits.argmax(-1))
        return (tokens, trajectory) if return_trajectory else tokens

    @staticmethod
    def _step(z, x0_hat, gamma_t, gamma_s, sampler, noise_scale, score_temperature, generator):
        """One reverse step from noise level gamma_t to the cleaner gamma_s (VDM's posterior, float64 scalars)."""
        (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(gamma_t), alpha_sigma(gamma_s)
        eps_hat = (z - alpha_t.item() * x0_hat) / (sigma_t.item() * score_temperature)
        if sampler == "ddim":
            x0_hat = (z - sigma_t.item() * eps_hat) / alpha_t.item()  # the x0 that the scaled eps implies
            return alpha_s.item() * x0_hat + sigma_s.item() * eps_hat
        c = -torch.expm1(gamma_s - gamma_t)  # 1 - SNR_t / SNR_s
        mean = (alpha_s / alpha_t).item() * (z - (c * sigma_t).item() * eps_hat)
        noise = torch.randn(z.shape, device=z.device, generator=generator)
        return mean + (sigma_s * c.sqrt()).item() * noise_scale * noise
