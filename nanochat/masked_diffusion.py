"""
Masked (absorbing-state) diffusion: MDLM (Sahoo et al. 2024) on the transformer of the other models (bidirectional
blocks, RoPE, QK-norm), so that it compares with them at equal shape.

Forward process: every token of x is replaced by [MASK] (id vocab_size: the input table has vocab_size + 1 rows)
independently with probability 1 - alpha_t = t: the log-linear schedule alpha_t = 1 - t, clean at t = 0, all mask
at t = 1. The network sees z_t and predicts x at every position over the vocab_size real tokens: its head has no
[MASK] output (zero mass on the mask), and at an unmasked position the prediction is the token itself (SUBS; such
a position adds nothing to the loss and the sampler never changes it). No time conditioning, as MDLM's default:
the share of masks tells the network t, and its output then depends on z_t alone, which makes the sampler's cache
exact (adaLN time conditioning, as the continuous model has, did no better in a 300-step check: dev/LOG.md).

The bound. One reverse step t -> s of the discrete-time ELBO is q(z_s | z_t, x) against q(z_s | z_t, x_theta(z_t)).
An unmasked position is carried over in both (KL 0); a masked one is unmasked with probability
(alpha_s - alpha_t) / (1 - alpha_t), to x under q and to x_theta's draw under the model (which has no mass on
[MASK], so the stay-masked terms cancel), so its KL is that probability times -log x_theta(x^l | z_t). Summed over
ever finer steps:

    -log p(x) <= int_eps^1 (-alpha_t' / (1 - alpha_t)) E_q[ sum_{l masked in z_t} -log x_theta(x^l | z_t) ] dt + R
              =  int_eps^1 (1 / t) E_q[ sum_{masked l} CE_l(z_t) ] dt + R          (alpha_t' = -1, 1 - alpha_t = t)

with no prior term (z_1 is all mask whatever x is) and R = E_q[ sum_{masked l} CE_l(z_eps) ], the reconstruction
of the t = eps masks (eps = T_MIN keeps the 1/t weight bounded; R is about eps * seq_len * CE). The training loss is
the integrand at one stratified t per row, per token; token_nll() estimates the whole right-hand side with
bound_samples stratified t per sequence, plus R.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.diffusion_roberta import sample_known, sample_t
from nanochat.transformer import TokenTransformer, TransformerConfig, knob, norm

T_MIN = 1e-3  # the smallest masking probability, as in MDLM: t in [T_MIN, 1]


@dataclass
class MaskedDiffusionConfig(TransformerConfig):
    cond_rate: float = knob(0.25, "fraction of training rows with a clean prefix / clean text around a gap, never masked")
    bound_samples: int = knob(32, "timesteps (stratified) per sequence when evaluating the likelihood bound")

    def __post_init__(self):
        super().__post_init__()
        self.check([
            (0 <= self.cond_rate <= 1, "cond_rate must lie in [0, 1]"),
            (self.bound_samples >= 1, "bound_samples must be >= 1"),
        ])


class MaskedDiffusion(TokenTransformer):
    nll_kind = "likelihood bound"  # token_nll() is an upper bound on the NLL
    sampler_defaults = dict(num_steps=128)
    can_infill = True

    def __init__(self, config):
        super().__init__(config, causal=False, input_rows=config.vocab_size + 1)  # the real tokens and [MASK]
        self.mask_id = config.vocab_size  # the head has no [MASK] output

    def logits(self, z):
        """(B, T, vocab_size) float logits of x at every position of z (ids, [MASK] included)."""
        cos_sin = (self.rope_cos[:, : z.size(1)], self.rope_sin[:, : z.size(1)])
        h = self.wte(z)
        for block in self.blocks:
            h = block(h, cos_sin)
        return self.lm_head(norm(h)).float()

    def masked_ce(self, tokens, t, known):
        """-log x_theta(x^l | z_t) at the positions that z_t masks, 0 elsewhere, (B, T): every position not known is
        masked with probability t (B,) of its row."""
        masked = (torch.rand(tokens.shape, device=tokens.device) < t.float().to(tokens.device)[:, None]) & ~known
        z = torch.where(masked, self.mask_id, tokens)
        ce = F.cross_entropy(self.logits(z).flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        return ce * masked

    def forward(self, tokens):
        """The training loss: (1 / t) x the masked positions' cross-entropy, t stratified over the rows, per token
        that is not kept clean (the cond_rate rows' prompt or infill context)."""
        B, T = tokens.shape
        t = T_MIN + (1 - T_MIN) * sample_t(B)
        known = sample_known(B, T, self.config.cond_rate if self.training else 0.0, tokens.device)
        loss = self.masked_ce(tokens, t, known) / t.float().to(tokens.device)[:, None]
        return loss.sum() / (~known).sum().clamp(min=1)

    @torch.no_grad()
    def token_nll(self, tokens):
        """(upper bound on -log p in nats per token (B, T), the target ids): the module docstring's bound, its
        integral over [T_MIN, 1] from bound_samples stratified t per row, plus the reconstruction at T_MIN."""
        B, T = tokens.shape
        K, no_known = self.config.bound_samples, torch.zeros_like(tokens, dtype=torch.bool)
        u = torch.rand(B, dtype=torch.float64)
        integral = torch.zeros(B, T, device=tokens.device)
        for k in range(K):
            t = T_MIN + (1 - T_MIN) * (u + k) / K
            integral += self.masked_ce(tokens, t, no_known) / t.float().to(tokens.device)[:, None]
        reconstruction = self.masked_ce(tokens, torch.full((B,), T_MIN, dtype=torch.float64), no_known)
        return (1 - T_MIN) * integral / K + reconstruction, tokens

    @classmethod
    def check_sampler(cls, temperature, settings):
        super().check_sampler(temperature, settings)
        n = settings["num_steps"]
        TransformerConfig.check([(isinstance(n, int) and n >= 1, f"num_steps must be an integer >= 1, got {n}")])

    def describe_sampler(self, settings):
        return f"{settings['num_steps']} ancestral unmasking steps"

    def progress_steps(self, seq_len, known, settings):
        """Calls of generate()'s callback: one per step."""
        return settings["num_steps"]

    @torch.no_grad()
    def generate(self, num_samples, seq_len, known=None, temperature=1.0, generator=None, callback=None, cache=True,
                 **options):
        """MDLM's ancestral sampler -> (num_samples, seq_len) ids. From all [MASK] (known {position: id} unmasked:
        a prompt, or the text around infilling gaps) through t = 1, 1 - 1/n, ..., 0 (n = num_steps): from t to
        s = t - 1/n every masked position is unmasked with probability (t - s) / t = 1 / (steps left), to a token
        drawn from the prediction at temperature; unmasked positions stay, and the last step (s = 0) fills every
        mask left. A step that unmasks nothing leaves z as it was, so the next one reuses its logits (MDLM's cache:
        without time conditioning they are the same); cache=False evaluates the network every step (for tests).
        callback() runs after every step."""
        n = self.sampler_settings(temperature, **options)["num_steps"]
        known = self.check_known(seq_len, known)
        device = self.wte.weight.device
        z = torch.full((num_samples, seq_len), self.mask_id, dtype=torch.long, device=device)
        for pos, tok in known.items():
            z[:, pos] = tok
        logits = None
        for i in range(n):
            if logits is None or not cache:
                logits = self.logits(z)
            reveal = (z == self.mask_id) & (torch.rand(z.shape, device=device, generator=generator) * (n - i) < 1)
            if reveal.any():
                probs = torch.softmax(logits[reveal] / temperature, dim=-1)
                z[reveal] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                logits = None
            if callback is not None:
                callback()
        return z
