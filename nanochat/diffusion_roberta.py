"""
A continuous (embedding-space) diffusion language model with a RoBERTa-style bidirectional transformer.

Reading order, top to bottom:
1. DiffusionConfig: every knob, plain values only (round-trips through JSON for checkpoints); each field is
   also a training flag of the same name.
   The transformer blocks and the interface shared with the GPT live in nanochat/transformer.py.
2. Noise schedules: alpha_bar(t) for cosine / linear / sqrt, and NoiseSchedule, which maps t in [0, 1]
   to gamma = -log SNR, truncated to [gamma_min, gamma_max]. All schedule arithmetic is float64.
3. DiffusionRoBERTa: the denoiser, the training loss (objectives `logits`, `eps`), the samplers
   (ancestral DDPM, deterministic DDIM; labels and classifier-free guidance) and the continuous-time likelihood
   bound (VDM / Plaid).

Notation (variance preserving): z_t = alpha_t * x + sigma_t * eps, alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t), where x is the (unit-norm, sqrt(embed_dim)-scaled) token embedding.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.evaluate import unigram_log_prior
from nanochat.transformer import Block, LanguageModel, TransformerConfig, knob, norm

OBJECTIVES = ("logits", "eps")
SCHEDULES = ("cosine", "linear", "sqrt")
SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("t", "log_snr")


@dataclass
class DiffusionConfig(TransformerConfig):
    embed_dim: int = knob(64, "dimension of the (low-dimensional) space the diffusion runs in")
    objective: str = knob("logits", "logits: cross-entropy on the clean tokens | eps: MSE on the noise + rounding CE")
    schedule: str = knob("cosine", "shape of gamma(t): where training spends its timesteps and how the sampler steps")
    gamma_min: float = knob(0.5, "log-SNR truncation: gamma = -log SNR at t=0")
    gamma_max: float = knob(6.0, "gamma at t=1")
    self_cond: bool = knob(True, "feed the previous estimate of x0 back in (Chen et al., Analog Bits)")
    self_cond_rate: float = knob(0.5, "fraction of training micro-batches that get a self-conditioning first pass")
    cond_rate: float = knob(0.25, "fraction of training rows with clean prefix / infill tokens")
    bound_samples: int = knob(32, "timesteps (stratified) per sequence when evaluating the likelihood bound")
    elbo_weight: float = knob(1.0, "add this times the ELBO-weighted MSE (the bound's diffusion term) to the loss")
    block_size: int = knob(0, "0: diffuse the whole sequence | K: blocks of K tokens, each given the clean blocks before it")
    local_mix: int = knob(3, "K > 0 (odd): before every block, each position adds a learned depthwise mix of its K-neighbourhood")
    output_prior: bool = knob(False, "logits objective: add the training data's log unigram frequencies to the logits "
                                     "(with labels, each label's own)")
    label_dropout: float = knob(0.15, "with --label_column: fraction of training rows whose labels become the null label "
                                      "(one model both conditional and unconditional, for classifier-free guidance)")
    distilled_steps: int = knob(0, "0: not distilled | N: distilled for N deterministic steps (scripts.diffusion_distill), "
                                   "generate()'s default")
    # attribute conditioning's label set, from the data (--label_column: the column's sorted values over the train
    # split), not a flag; empty = a model without labels
    labels: list = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        self.check([
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.embed_dim >= 1, "embed_dim must be >= 1"),
            (math.isfinite(self.gamma_min) and math.isfinite(self.gamma_max) and self.gamma_min < self.gamma_max,
             "gamma_min must be below gamma_max (both finite)"),
            (all(0 <= r <= 1 for r in (self.self_cond_rate, self.cond_rate, self.label_dropout)), "rates must lie in [0, 1]"),
            (all(isinstance(l, str) and l for l in self.labels) and len(set(self.labels)) == len(self.labels),
             f"labels must be distinct non-empty strings, got {self.labels}"),
            (self.bound_samples >= 1, "bound_samples must be >= 1"),
            (0 <= self.elbo_weight < math.inf, "elbo_weight must be finite and >= 0"),
            (self.block_size >= 0, "block_size must be >= 0 (0 = the whole sequence)"),
            (self.local_mix == 0 or (self.local_mix > 0 and self.local_mix % 2 == 1), "local_mix must be 0 (off) or an odd kernel size"),
            (self.distilled_steps >= 0, "distilled_steps must be >= 0 (0 = not distilled)"),
        ])


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
        # on the CPU whatever the default device (a model built on the meta device needs real numbers here)
        lo, hi = torch.zeros((), dtype=torch.float64, device="cpu"), torch.ones((), dtype=torch.float64, device="cpu")
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


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def alpha_sigma(gamma):
    """(alpha, sigma) from gamma = -log SNR, computed in float64."""
    gamma = gamma.double()
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class NoiseLevel(NamedTuple):
    """What the network and the losses need of the noise levels gamma (B,): float32 on the model's device, (B, 1, 1)
    to broadcast over (B, T, e), except time (B,)."""
    alpha: torch.Tensor
    sigma: torch.Tensor
    evidence_scale: torch.Tensor  # alpha / sigma^2: log p(w | z_t) = evidence_scale * z . e_w + const
    elbo_weight: torch.Tensor  # gamma'(t) exp(-gamma) / 2: the bound's weight on ||x - x0_hat||^2 (0 if no slope)
    time: torch.Tensor  # gamma mapped to [0, 1000] for the sinusoidal time features

    def at(self, i):
        """Level i of a table of levels, shaped for a batch of any size."""
        return NoiseLevel(*(v[i:i + 1] for v in self))


def timestep_features(x, dim=256, max_period=10000.0):
    """Sinusoidal features of a scalar per row (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sample_t(batch_size):
    """Training timesteps (B,) in [0, 1), stratified: one per stratum, shuffled across rows (low-variance estimates)."""
    u = torch.rand((), dtype=torch.float64)
    strata = torch.randperm(batch_size).double()
    return (strata + u) / batch_size


def sample_known(batch_size, seq_len, cond_rate, device):
    """Clean positions (B, T) for conditional training: on cond_rate of the rows, either a prefix (prompt
    completion, up to half the row) or everything outside a gap of at least half the row (infilling). Evaluation
    passes cond_rate 0: the loss and the bound are about unconditional generation."""
    if cond_rate == 0:
        return torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    pos = torch.arange(seq_len, device=device)[None, :]
    r = torch.rand(batch_size, 4, device=device)
    prefix_len = (1 + r[:, 0] * (seq_len // 2)).long()[:, None]
    gap_len = (seq_len - seq_len // 2 + r[:, 1] * (seq_len // 2 + 1)).long().clamp(max=seq_len)[:, None]
    gap_start = (r[:, 2:3] * (seq_len - gap_len + 1)).long()
    prefix = pos < prefix_len
    infill = (pos < gap_start) | (pos >= gap_start + gap_len)
    use_prefix = (r[:, 3] < 0.5)[:, None]
    conditioned = (torch.rand(batch_size, device=device) < cond_rate)[:, None]
    return conditioned & torch.where(use_prefix, prefix, infill)


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

class DiffusionRoBERTa(LanguageModel):
    nll_kind = "likelihood bound"  # token_nll() is an upper bound on the NLL
    # learning rates that differ from the GPT's (nanochat.optim.LEARNING_RATES): one noise level per row makes a much
    # noisier gradient, the head only learns what context adds to the posterior skip, and the embeddings (the space
    # the noise lives in) learn better at each lower rate measured, down to a twentieth of the GPT's (dev/LOG.md)
    learning_rates = dict(matrix_lr=0.01, embedding_lr=0.01, head_lr=0.001)
    # generate()'s sampler options and their defaults: noise at 0.85 of the reverse process's and a score temperature
    # of 0.9 sampled best against the GPT; both at 1 give the model's own reverse process
    sampler_defaults = dict(num_steps=128, sampler="ddpm", noise_scale=0.85, score_temperature=0.9, spacing="t", clamp=False,
                            compile=False, label=None, guidance=0.0)

    def __init__(self, config):
        super().__init__(config)
        rng = torch.get_rng_state()  # the modules' default init must not shift the seeded draws of init_weights()
        d, e = config.model_dim, config.embed_dim
        self.schedule = NoiseSchedule(config.schedule, config.gamma_min, config.gamma_max)
        self.embedding = nn.Embedding(config.vocab_size, e)  # normalised in embed_matrix(): no collapse, no blow-up
        self.in_proj = nn.Linear(e, d, bias=False)
        # block diffusion's clean stream: known token ids, looked up as a GPT looks up its input (V x d)
        self.context_embedding = nn.Embedding(config.vocab_size, d) if config.block_size else None
        self.self_cond_proj = nn.Linear(e, d, bias=False)  # zero-init: self-conditioning starts as a no-op
        self.known_embed = nn.Parameter(torch.zeros(d))  # marks clean (prompt / infill) positions
        # attribute conditioning: a vector per label, the last row for "no label", added at every position (a token's
        # label is its document's: a row spanning two documents is conditioned piecewise); zero-init: a no-op at first
        self.label_embed = nn.Embedding(len(config.labels) + 1, d) if config.labels else None
        self.time_mlp = nn.Sequential(nn.Linear(256, d, bias=False), nn.SiLU(), nn.Linear(d, d, bias=False))
        self.blocks = nn.ModuleList([Block(d, config.n_head, causal=False, modulated=True) for _ in range(config.depth)])
        # zero-init depthwise convolutions over positions: neighbours' evidence reaches every position without first
        # learning to attend to it (Canon layers, Allen-Zhu 2025), as the current token reaches a GPT's prediction
        self.local_mix = nn.Parameter(torch.zeros(config.depth, config.local_mix, d)) if config.local_mix else None
        self.head = nn.Linear(d, config.vocab_size if config.objective == "logits" else e, bias=False)
        # the output prior: with the posterior skip, the untrained model is the best denoiser that sees each token
        # alone, and the network learns only what context adds (saved with the weights); with labels, one per label
        # and the whole data's for the null label, so that the label moves the prediction before anything is learned
        use_prior = config.output_prior and config.objective == "logits"
        rows = (len(config.labels) + 1,) if config.labels else ()
        self.register_buffer("log_prior", torch.zeros(*rows, config.vocab_size) if use_prior else None)
        torch.set_rng_state(rng)
        self.init_weights()
        if config.distilled_steps:  # a distilled student samples by default as it was distilled: N deterministic steps
            self.sampler_defaults = dict(self.sampler_defaults, num_steps=config.distilled_steps, sampler="ddim", score_temperature=1.0)

    def init_weights(self):
        super().init_weights()
        nn.init.normal_(self.embedding.weight, std=1.0)
        if self.context_embedding is not None:
            nn.init.normal_(self.context_embedding.weight, std=1.0)
        nn.init.zeros_(self.self_cond_proj.weight)
        nn.init.zeros_(self.known_embed)
        if self.label_embed is not None:
            nn.init.zeros_(self.label_embed.weight)
        nn.init.zeros_(self.head.weight)
        if self.log_prior is not None:
            nn.init.zeros_(self.log_prior)
        if self.local_mix is not None:
            nn.init.zeros_(self.local_mix)

    @torch.no_grad()
    def fit_unigram_prior(self, batches):
        """With output_prior, the log unigram frequencies of the training batches ((B, T) tokens; (tokens, labels)
        for a model with labels: one prior per label, and all tokens' for the null label) become the output prior."""
        V, labels = self.config.vocab_size, self.config.labels
        if self.log_prior is None:
            return
        if not labels:
            self.log_prior.copy_(unigram_log_prior(batches, V))
            return
        batches = list(batches)
        by_label = [unigram_log_prior((t[l == i] for t, l in batches), V) for i in range(len(labels))]
        self.log_prior.copy_(torch.stack(by_label + [unigram_log_prior((t for t, _ in batches), V)]))

    def prior_logits(self, labels):
        """The output prior for (B, T) label ids (None: the null label): (V,) or (B, T, V)."""
        if self.log_prior.dim() == 1:
            return self.log_prior
        return self.log_prior[len(self.config.labels) if labels is None else labels]

    # --- bookkeeping -------------------------------------------------------

    def matmul_params(self):
        """Parameters that cost 2 FLOPs per token in the forward pass (not the embedding lookup, and not the
        time MLP / adaLN, which run once per sequence)."""
        per_sequence = {"embedding", "context_embedding", "time_mlp", "modulation", "known_embed", "label_embed"}
        return sum(p.numel() for n, p in self.named_parameters() if not per_sequence & set(n.split(".")))

    def forward_flops(self, seq_len=None):
        """FLOPs per token of one forward pass of the network: 2N + attention. N counts the products with the embedding
        matrix too (z @ E^T for the skip and softmax @ E), and, for block diffusion, the clean stream's share of the
        network."""
        c = self.config
        T = seq_len or c.max_seq_len
        n = self.matmul_params()
        clean = self.clean_length(T) / T  # block diffusion: the clean stream runs through the network but not the head
        n += clean * (n - self.head.weight.numel())
        if c.objective == "logits":  # the evidence z @ E^T and softmax(logits) @ E
            n += 2 * c.vocab_size * c.embed_dim
        return 2 * n + 4 * c.depth * c.model_dim * T * (1 + clean) ** 2

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: forward + backward (three forward passes' worth), plus the expected no-grad
        self-conditioning forward pass on self_cond_rate of the micro-batches."""
        c = self.config
        return self.forward_flops(seq_len) * (3 + (c.self_cond_rate if c.self_cond else 0))

    def param_groups(self):
        """Hidden matrices go to Muon; embeddings, head, local mixing, projections and scalars go to AdamW (the label
        vectors, added to the hidden state like known_embed, with it in "other")."""
        matrix = [p for n, p in self.named_parameters() if n.startswith("blocks.") and ".modulation." not in n]
        embedding = [t.weight for t in (self.embedding, self.context_embedding) if t is not None]
        head = [self.head.weight]
        mix = [self.local_mix] if self.local_mix is not None else []
        taken = {id(p) for p in matrix + embedding + head + mix}
        other = [p for p in self.parameters() if id(p) not in taken]
        return dict(matrix=matrix, embedding=embedding, head=head, other=other, mix=mix)

    # --- the denoiser ------------------------------------------------------

    def embed_matrix(self):
        """Token embeddings on a sphere of radius sqrt(embed_dim): unit variance per coordinate."""
        return F.normalize(self.embedding.weight.float(), dim=-1) * math.sqrt(self.config.embed_dim)

    def noise_level(self, gamma, slope=None):
        """The NoiseLevel of gamma (B,) (and of the schedule's slope d gamma / dt, for the ELBO weight), computed in
        float64 on the CPU (MPS has no float64) and moved to the model's device in one copy."""
        c = self.config
        alpha, sigma = alpha_sigma(gamma)
        elbo = 0.5 * slope * torch.exp(-gamma) if slope is not None else torch.zeros_like(gamma)
        time = (gamma - c.gamma_min) / (c.gamma_max - c.gamma_min) * 1000
        rows = torch.stack([alpha, sigma, alpha / sigma**2, elbo, time]).float().to(self.embedding.weight.device)
        return NoiseLevel(*(r[:, None, None] for r in rows[:4]), rows[4])

    def denoise(self, z, level, known, x0_self_cond, context=None, offset=0, labels=None):
        """One network evaluation: noisy embeddings z (B,T,e) at positions offset.. offset+T-1, their NoiseLevel,
        clean-position mask known (B,T), the previous x0 estimate (B,T,e) -> head output (B,T,vocab or e).
        Block diffusion: context (B,S) holds the clean token ids of positions 0..S-1, a second stream that each noisy
        block sees up to its own start. labels (B,T): each position's label id (None: the null label everywhere)."""
        T = z.size(1)
        h = self.in_proj(z) + self.self_cond_proj(x0_self_cond) + known[..., None] * self.known_embed
        if self.label_embed is not None:  # labels None: every position gets the null label's vector
            h = h + (self.label_embed.weight[-1] if labels is None else self.label_embed(labels))
        positions, attn_mask = torch.arange(offset, offset + T, device=z.device), None
        if context is not None:
            h = torch.cat([h, self.context_embedding(context).to(h.dtype)], dim=1)
            clean = torch.arange(context.size(1), device=z.device)
            attn_mask = block_attention_mask(positions, clean, self.config.block_size)
            positions = torch.cat([positions, clean])
        cond = F.silu(self.time_mlp(timestep_features(level.time).to(h.dtype)))
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

    def token_evidence(self, z, level, known, E):
        """log p(w | z_t) of each token seen alone, (B,T,V): alpha / sigma^2 * z . e_w (+ a constant, as all e_w
        share a norm). Clean (known) positions get a sharp posterior: their z is exactly their embedding."""
        scale = torch.where(known[..., None], 100.0, level.evidence_scale)
        return (scale * z.float()) @ E.t()  # scaled in e dims, not V: cheaper

    def predict_x0(self, z, level, known, x0_self_cond, temperature=1.0, context=None, offset=0, labels=None):
        """Denoise and express the result as (x0_hat (B,T,e), logits (B,T,V)), whatever the objective."""
        E = self.embed_matrix()
        out = self.denoise(z, level, known, x0_self_cond, context, offset, labels).float()
        if self.config.objective == "logits":
            # the posterior skip: the network only has to learn what context adds; at low noise it identifies the token
            logits = out + self.token_evidence(z, level, known, E)
            logits = logits if self.log_prior is None else logits + self.prior_logits(labels)
            logits = logits if temperature == 1 else logits / temperature
            return torch.softmax(logits, dim=-1) @ E, logits  # score interpolation (CDCD, Plaid)
        x0 = (z - level.sigma * out) / level.alpha  # eps: invert z = alpha x + sigma eps
        return x0, (x0 @ E.t()) / temperature  # all embeddings share a norm: dot product ranks by distance

    # --- training ----------------------------------------------------------

    def noised(self, x, level, known):
        eps = torch.randn_like(x)
        z = torch.where(known[..., None], x, level.alpha * x + level.sigma * eps)
        return z, eps

    @torch.compiler.disable  # float64 on the CPU and a coin for a Python branch: before the compiled graph
    def draw_noise(self, batch_size):
        """A training micro-batch's randomness drawn on the CPU: its noise levels (stratified t, with the ELBO weight)
        and whether it gets a self-conditioning pass (on self_cond_rate of the micro-batches; always when evaluating)."""
        level = self.noise_level(*self.schedule.gamma_and_slope(sample_t(batch_size)))
        coin = not self.training or torch.rand(()).item() < self.config.self_cond_rate
        return level, self.config.self_cond and coin

    def self_condition(self, z, level, known, x, context=None, first_pass=None, labels=None):
        """The self-conditioning input: zeros, or a no-grad first estimate of x0 (with first_pass, as drawn for a
        training micro-batch; always when evaluating). Clean positions carry their true embedding."""
        x0_sc = torch.zeros_like(z)
        if self.config.self_cond if first_pass is None else first_pass:
            with torch.no_grad():
                x0_sc = self.predict_x0(z, level, known, x0_sc, context=context, labels=labels)[0]
        return torch.where(known[..., None], x, x0_sc)

    def clean_length(self, seq_len):
        """Length of block diffusion's clean stream for whole sequences: the positions before the last block (no
        block sees its own or later clean tokens); 0 for whole-sequence diffusion."""
        K = self.config.block_size
        return (seq_len - 1) // K * K if K else 0

    def clean_context(self, tokens):
        """Block diffusion's clean stream (ids) for whole (B,T) sequences; None for whole-sequence diffusion."""
        return tokens[:, : self.clean_length(tokens.size(1))] if self.config.block_size else None

    def drop_labels(self, tokens, labels):
        """The (B, T) label ids of a training batch (None: none), checked, with the null label on label_dropout of the
        rows in training mode (condition dropout: the unconditional model that guidance needs)."""
        if labels is None:
            return None
        if self.label_embed is None:
            raise ValueError("labels given to a model without labels: train it with --label_column")
        if labels.shape != tokens.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of the tokens {tuple(tokens.shape)}")
        if not self.training or self.config.label_dropout == 0:
            return labels
        dropped = torch.rand(labels.size(0), device=labels.device) < self.config.label_dropout
        return labels.masked_fill(dropped[:, None], len(self.config.labels))

    def forward(self, tokens, labels=None):
        """The training loss (a scalar) for a (B, T) batch of token ids, each with its label id (B, T) when the model
        has labels (None: the null label everywhere)."""
        B, T = tokens.shape
        level, first_pass = self.draw_noise(B)
        x = F.embedding(tokens, self.embed_matrix())
        known = sample_known(B, T, self.config.cond_rate if self.training else 0.0, tokens.device)
        labels = self.drop_labels(tokens, labels)
        z, eps = self.noised(x, level, known)
        context = self.clean_context(tokens)
        x0_sc = self.self_condition(z, level, known, x, context, first_pass, labels)
        x0_hat, logits = self.predict_x0(z, level, known, x0_sc, context=context, labels=labels)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(B, T)
        if self.config.elbo_weight > 0:  # the per-token diffusion term of nll_bound at this timestep
            loss = loss + self.config.elbo_weight * level.elbo_weight[..., 0] * (x - x0_hat).square().sum(-1)
        if self.config.objective == "eps":  # MSE on the noise, plus the rounding CE above
            loss = loss + ((z - level.alpha * x0_hat) / level.sigma - eps).square().mean(-1)
        noised = ~known
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
        # prior: KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)), summed over the embedding dimensions
        a1sq, s1sq = sigmoid(-c.gamma_max), sigmoid(c.gamma_max)
        prior = 0.5 * (a1sq * x.square().sum(-1) + c.embed_dim * (s1sq - 1 - math.log(s1sq)))
        # reconstruction: -log p(w | z_0) under the exact Gaussian posterior over the vocabulary
        a0, s0 = math.sqrt(sigmoid(-c.gamma_min)), math.sqrt(sigmoid(c.gamma_min))
        z0 = a0 * x + s0 * torch.randn_like(x)
        recon = F.cross_entropy((z0 @ E.t() * (a0 / s0**2)).flatten(0, 1), tokens.flatten(), reduction="none").view(B, T)
        # diffusion: 1/2 E_t[gamma'(t) exp(-gamma(t)) ||x - x0_hat(z_t)||^2]; with blocks, each block's term is
        # conditioned on the clean blocks before it, and the chain rule sums them (one shared t per row)
        u = torch.rand(B, dtype=torch.float64)
        diffusion = torch.zeros(B, T, device=tokens.device)
        context = self.clean_context(tokens)
        for k in range(K):
            level = self.noise_level(*self.schedule.gamma_and_slope((u + k) / K))
            z, _ = self.noised(x, level, no_known)
            x0_hat, _ = self.predict_x0(z, level, no_known, self.self_condition(z, level, no_known, x, context), context=context)
            diffusion += level.elbo_weight[..., 0] * (x - x0_hat).square().sum(-1)
        return prior + recon + diffusion / K

    def token_nll(self, tokens):
        """(nats per target token, target ids), the interface shared with the GPT for bits per byte."""
        return self.nll_bound(tokens), tokens

    @torch.no_grad()
    def context_gain(self, tokens, log_prior, gammas, seed=0):
        """Does the model use context, and at which noise levels? For each gamma = -log SNR: the model's cross-entropy
        on the clean tokens of (B, T) `tokens` noised at gamma, next to that of the best denoiser that sees every token
        alone (the unigram log_prior plus the exact Gaussian likelihood of the token's own noisy embedding). Returns
        [dict(gamma, model_ce, no_context_ce, gain)] in nats per token; a gain near zero means that the model has
        learned nothing about context at that noise level."""
        B, T = tokens.shape
        E = self.embed_matrix()
        x = F.embedding(tokens, E)
        no_known = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        context, rows = self.clean_context(tokens), []
        for g in gammas:
            torch.manual_seed(seed)  # the same noise for every level's draw, and for every checkpoint compared
            level = self.noise_level(torch.full((B,), float(g), dtype=torch.float64))
            z, _ = self.noised(x, level, no_known)
            _, logits = self.predict_x0(z, level, no_known, self.self_condition(z, level, no_known, x, context), context=context)
            alone = log_prior.to(tokens.device) + self.token_evidence(z, level, no_known, E)
            ce = [F.cross_entropy(l.float().flatten(0, 1), tokens.flatten()).item() for l in (logits, alone)]
            rows.append(dict(gamma=float(g), model_ce=ce[0], no_context_ce=ce[1], gain=ce[1] - ce[0]))
        return rows

    # --- sampling ----------------------------------------------------------

    @classmethod
    def check_sampler(cls, temperature, settings):
        super().check_sampler(temperature, settings)
        g = settings["guidance"]
        TransformerConfig.check([
            (isinstance(settings["num_steps"], int) and settings["num_steps"] >= 1, f"num_steps must be an integer >= 1, got {settings['num_steps']}"),
            (settings["sampler"] in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {settings['sampler']!r}"),
            (settings["spacing"] in SPACINGS, f"spacing must be one of {SPACINGS}, got {settings['spacing']!r}"),
            (0 <= settings["noise_scale"] < math.inf, f"noise_scale must be finite and >= 0, got {settings['noise_scale']}"),
            (0 < settings["score_temperature"] < math.inf, f"score_temperature must be finite and > 0, got {settings['score_temperature']}"),
            (settings["label"] is None or isinstance(settings["label"], str), f"label must be a label name, got {settings['label']!r}"),
            (isinstance(g, (int, float)) and 0 <= g < math.inf, f"guidance must be finite and >= 0 (0 = no guidance), got {g}"),
        ])

    def check_settings(self, settings):
        """What sampler_settings cannot check without the model: that it knows the label."""
        self.label_index(settings["label"])

    def label_index(self, label):
        """The id of a label name (None: the null label); ValueError naming the model's labels if it has no such label."""
        labels = self.config.labels
        if label is None:
            return len(labels)
        if not labels:
            raise ValueError(f"label {label!r}: this model was trained without --label_column, so it has no labels; "
                             f"sample it without a label, or train one with --label_column")
        if label not in labels:
            raise ValueError(f"unknown label {label!r}: this model's labels are {', '.join(labels)}")
        return labels.index(label)

    def describe_sampler(self, settings):
        """'128 ddpm steps, noise x0.85, score temperature 0.9' (what a report says about how samples were drawn)."""
        how = f"{settings['num_steps']} {settings['sampler']} steps"
        if settings["sampler"] == "ddpm" and settings["noise_scale"] != 1:
            how += f", noise x{settings['noise_scale']:g}"
        if settings["score_temperature"] != 1:
            how += f", score temperature {settings['score_temperature']:g}"
        how += ", steps even in log-SNR" if settings["spacing"] == "log_snr" else ""
        how += ", clamped" if settings["clamp"] else ""
        how += ", compiled" if settings["compile"] else ""
        how += f", label {settings['label']!r}" if settings["label"] is not None else ""
        how += f", guidance {settings['guidance']:g}" if settings["guidance"] else ""
        return how + (f", blocks of {self.config.block_size} tokens left to right" if self.config.block_size else "")

    def progress_steps(self, seq_len, known, settings):
        """Calls of generate()'s callback: num_steps per block."""
        return -(-seq_len // (self.config.block_size or seq_len)) * settings["num_steps"]

    @property
    def can_infill(self):
        return not self.config.block_size  # block diffusion writes left to right: it cannot see text after a gap

    def step_gammas(self, num_steps, spacing="t"):
        """gamma at the num_steps + 1 ends of the sampler's steps, from t = 1 to t = 0 (float64): evenly spaced in t, or
        in gamma = -log SNR itself (closer to many steps' path for few deterministic steps; dev/LOG.md)."""
        t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
        if spacing == "log_snr":
            ends = self.schedule.gamma(t[[0, -1]]).tolist()
            return torch.linspace(*ends, num_steps + 1, dtype=torch.float64)
        return self.schedule.gamma(t)

    @torch.no_grad()
    def generate(self, num_samples, seq_len, known=None, temperature=1.0, generator=None, callback=None,
                 return_trajectory=False, **options):
        """Denoise from pure noise -> (num_samples, seq_len) token ids. known: {position: token id, or a
        sequence of num_samples ids (a prompt per sample)} that appear unchanged (a prompt, or the text around
        infilling gaps). temperature divides the logits and scales the ancestral noise. options
        (sampler_defaults): num_steps; sampler ddpm (ancestral) or ddim (deterministic); noise_scale scales the
        ancestral noise further; score_temperature divides the predicted noise, which sharpens every step
        towards the denoised estimate (Plaid's score temperature); spacing t or log_snr spaces the steps evenly
        in t or in gamma = -log SNR (step_gammas); clamp snaps each x0 estimate to its nearest token embedding
        (Diffusion-LM); compile runs the denoiser through torch.compile; label conditions every position on one
        of the model's labels (config.labels); guidance w > 0 is classifier-free guidance (Ho & Salimans 2022):
        every step also runs the network without the conditions (no label, no known tokens), and the estimate
        becomes cond + w * (cond - uncond). With return_trajectory, also returns the list of argmax token
        estimates after every step. callback() runs after every step (progress bars).
        With block_size K, the blocks of K tokens are generated left to right, num_steps each, every block given
        the clean tokens before it (semi-autoregressive, as in SSD-LM and BD3-LM); guidance drops the label and the
        known tokens of the block being generated, while the clean blocks before it stay its context."""
        c, o = self.config, self.sampler_settings(temperature, **{**self.sampler_defaults, **options})  # (a distilled model's own)
        known = self.check_known(seq_len, known)
        label, w = self.label_index(o["label"]), o["guidance"]
        if w and not known and o["label"] is None:
            raise ValueError("guidance strengthens a condition, and there is none: give a label or known tokens (a prompt)")
        device = self.embedding.weight.device
        B, E, num_steps = num_samples, self.embed_matrix(), o["num_steps"]
        known_mask = torch.zeros(B, seq_len, dtype=torch.bool, device=device)
        known_ids = torch.zeros(B, seq_len, dtype=torch.long, device=device)
        for pos, tok in known.items():
            known_mask[:, pos] = True
            known_ids[:, pos] = torch.as_tensor(tok, device=device)  # an id, or one per sample
        x_known = F.embedding(known_ids, E)
        gammas = self.step_gammas(num_steps, o["spacing"])
        levels = self.noise_level(gammas)  # the whole table moved once: no host-device copy per step
        steps = reverse_steps(gammas, o["sampler"], temperature * o["noise_scale"], o["score_temperature"])
        tokens = known_ids.clone()
        trajectory = []
        predict_x0 = torch.compile(self.predict_x0) if o["compile"] else self.predict_x0

        def finish(x0_hat, logits, mask, xk):  # what the sampler makes of an estimate: clamped, known tokens kept
            if o["clamp"]:
                x0_hat = F.embedding(logits.argmax(-1), E)
            return torch.where(mask[..., None], xk, x0_hat)

        K = c.block_size or seq_len  # whole-sequence diffusion is one block
        for start in range(0, seq_len, K):  # block diffusion: each block given the clean tokens decided before it
            end = min(start + K, seq_len)
            mask, ids, xk = known_mask[:, start:end], known_ids[:, start:end], x_known[:, start:end]
            no_mask = torch.zeros_like(mask)
            labels = torch.full((B, end - start), label, device=device) if o["label"] is not None else None
            context = tokens[:, :start] if c.block_size else None
            z = torch.randn(B, end - start, c.embed_dim, device=device, generator=generator)
            x0_sc = x0_sc_uncond = torch.zeros_like(z)  # each branch's previous estimate, for self-conditioning
            for i in range(num_steps):
                z_known = torch.where(mask[..., None], xk, z)
                x0_hat, logits = predict_x0(z_known, levels.at(i), mask, x0_sc if c.self_cond else torch.zeros_like(z),
                                            temperature, context, start, labels)
                if w:  # the unconditional estimate: no label, and the known positions left to the sampler's own latent z
                    x0_u, logits_u = predict_x0(z, levels.at(i), no_mask, x0_sc_uncond if c.self_cond else torch.zeros_like(z),
                                                temperature, context, start, None)
                    # each branch self-conditions on its own estimate; guidance in logit space (dev/LOG.md)
                    x0_sc, x0_sc_uncond = finish(x0_hat, logits, mask, xk), finish(x0_u, logits_u, no_mask, xk)
                    logits = logits + w * (logits - logits_u)
                    x0_hat = torch.softmax(logits, dim=-1) @ E
                x0_hat = finish(x0_hat, logits, mask, xk)
                if not w:
                    x0_sc = x0_hat
                z = reverse_step(z_known, x0_hat, steps[i], generator)
                if return_trajectory:
                    trajectory.append(torch.cat([tokens[:, :start], torch.where(mask, ids, logits.argmax(-1))], dim=1))
                if callback is not None:
                    callback()
            tokens[:, start:end] = torch.where(mask, ids, logits.argmax(-1))
        return (tokens, trajectory) if return_trajectory else tokens

def reverse_steps(gammas, sampler, noise_scale, score_temperature):
    """The coefficients of each reverse step from gammas[i] to the cleaner gammas[i + 1] (VDM's posterior, in
    float64), as plain numbers: (a, b, noise) such that the step is z <- a * z + b * x0_hat + noise * N(0, I).
    The score temperature divides the predicted noise eps_hat = (z - alpha_t x0_hat) / sigma_t, which sharpens every
    step towards the denoised estimate; ddim recomputes x0 from the scaled eps and takes no noise."""
    alpha, sigma = (v.tolist() for v in alpha_sigma(gammas))
    g = gammas.tolist()
    steps = []
    for i in range(len(g) - 1):
        at, st, as_, ss = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if sampler == "ddim":  # x0 from the scaled eps, then alpha_s x0 + sigma_s eps_hat
            k = (ss - as_ * st / at) / (st * score_temperature)
            steps.append((as_ / at + k, -k * at, 0.0))
        else:  # the posterior mean (alpha_s / alpha_t) (z - c sigma_t eps_hat), c = 1 - SNR_t / SNR_s
            c = -math.expm1(g[i + 1] - g[i])
            k = c / score_temperature
            steps.append((as_ / at * (1 - k), as_ / at * k * at, ss * math.sqrt(c) * noise_scale))
    return steps


def reverse_step(z, x0_hat, step, generator=None):
    a, b, noise = step
    z = a * z + b * x0_hat
    return z + noise * torch.randn(z.shape, device=z.device, generator=generator) if noise else z
