"""
Few-step sampling by distillation of the continuous diffusion model (nanochat/diffusion_roberta.py).

Progressive distillation (Salimans & Ho 2022): a student, initialised as its teacher, learns to take in one
deterministic (DDIM) step what the frozen teacher takes in two; repeated, each student the next round's teacher,
it halves the step count round by round (scripts.diffusion_distill chains the rounds).

Student is the student: a DiffusionRoBERTa whose forward(tokens) is the distillation loss and that holds its teacher
outside its modules, so that nanochat/train.py trains it like any model (its optimiser groups, its FLOPs, its
evaluation, samples and checkpoints) and saves it as an ordinary diffusion checkpoint, whose config.distilled_steps = N
makes N DDIM steps (score temperature 1) its default sampler.

The loss at a step j of the student's N (from gamma_N[j] to gamma_N[j + 1] of its sampler's grid), drawn per row:
  z_t       the data noised to gamma_N[j] (clean tokens of a prompt or infill row kept, as in training)
  teacher   two DDIM steps, z_t -> z_t' -> z_t'' over its grid of 2N steps, at score temperature 1: two such steps
            are one step whose x0 is a convex combination of the teacher's two estimates, inside the hull of the
            token embeddings where the student's softmax(logits) @ E lives (at 0.9 the target leaves it by a multiple
            of z_t; dev/LOG.md)
  target    x0~ = (z_t'' - a z_t) / b, where z <- a z + b x0 is the student's one DDIM step (eq. 8 of the paper);
            on the last step, whose z the sampler never uses (its tokens are the argmax of the last estimate), the
            teacher's last estimate itself
  loss      max(SNR_t, 1) ||x0_hat(z_t) - x0~||^2 per noised token (the paper's truncated-SNR weighting)
Self-conditioning is formed as the sampler forms it: nothing on the sampler's first step, and on the later steps
the estimate of the step before, which the teacher's second step gets exactly; where the chain has no step before
(the teacher's first step, the student's step), a no-grad first pass at the same z_t stands in for it, as in the
model's own training. The token embeddings stay the teacher's (frozen): the diffusion runs in the teacher's space.
Consistency distillation (Song et al. 2023), measured against this on a small budget, followed its teacher less
closely (dev/LOG.md).
"""

import torch
import torch.nn.functional as F

from nanochat.diffusion_roberta import DiffusionRoBERTa, reverse_steps, sample_known, sample_t
from nanochat.optim import learning_rates

# the student's learning rates, as a fraction of the diffusion model's: Muon and AdamW step by about the learning rate
# whatever the gradient's size, and at the training rates a student that starts as its teacher drifts away from it
# faster than it learns (dev/LOG.md)
LEARNING_RATE_SCALE = 0.03


def ddim_coefficients(gammas, score_temperature, device):
    """(a, b) of each DDIM step of the grid, z <- a z + b x0_hat, as an (n, 2) float32 table on device."""
    steps = reverse_steps(gammas, "ddim", 1.0, score_temperature)
    return torch.tensor([s[:2] for s in steps], dtype=torch.float32, device=device)


class Student(DiffusionRoBERTa):
    """A student of config.distilled_steps = N steps, initialised as the teacher (2N steps, the same network)."""
    learning_rates = {name: LEARNING_RATE_SCALE * rate for name, rate in learning_rates(DiffusionRoBERTa).items()}

    def __init__(self, config, teacher):
        super().__init__(config)
        network = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("distilled_steps", "bound_samples")}
        if network(config) != network(teacher.config) or config.distilled_steps < 1:
            raise ValueError("a student needs its teacher's config (the evaluation's bound_samples aside) with distilled_steps >= 1")
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # not a module of the student: never saved or trained
        N, device = config.distilled_steps, teacher.embedding.weight.device
        self.__dict__["student_gammas"] = self.step_gammas(N)
        self.__dict__["teacher_gammas"] = teacher.step_gammas(2 * N)
        self.__dict__["student_steps"] = ddim_coefficients(self.student_gammas, 1.0, device)
        self.__dict__["teacher_steps"] = ddim_coefficients(self.teacher_gammas, 1.0, device)

    @classmethod
    def from_teacher(cls, teacher, config):
        """The student on the teacher's device with the teacher's weights; its token embeddings frozen."""
        with torch.device(teacher.embedding.weight.device):
            student = cls(config, teacher)
        student.load_state_dict(teacher.state_dict())
        student.embedding.weight.requires_grad_(False)
        return student

    def param_groups(self):
        return dict(super().param_groups(), embedding=[])  # the frozen embedding is in no group

    def flops_per_token(self, seq_len=None):
        """The student's forward + backward (three passes' worth) and the no-grad passes: the teacher's two steps,
        and with self-conditioning a first pass of the teacher and of the student."""
        return self.forward_flops(seq_len) * (3 + 2 + (2 if self.config.self_cond else 0))

    def estimate(self, model, z, level, known, x, first, context):
        """model's x0_hat at z (no grad unless model is the student in training), self-conditioned as the sampler is
        (nothing on its first step; otherwise a no-grad first pass at z, for the estimate of the step before)."""
        x0_sc = torch.zeros_like(z)
        if self.config.self_cond:
            with torch.no_grad():
                x0_sc = model.predict_x0(z, level, known, x0_sc, context=context)[0]
            x0_sc = torch.where(first, 0.0, torch.where(known[..., None], x, x0_sc))
        x0_hat = model.predict_x0(z, level, known, x0_sc, context=context)[0]
        return torch.where(known[..., None], x, x0_hat)

    def forward(self, tokens):
        """The distillation loss (a scalar) for a (B, T) batch of token ids."""
        B, T = tokens.shape
        N, device = self.config.distilled_steps, tokens.device
        j = (sample_t(B) * N).long().clamp(max=N - 1)  # the student's step of each row, stratified over the N
        jd = j.to(device)
        x = F.embedding(tokens, self.embed_matrix())
        known = sample_known(B, T, self.config.cond_rate if self.training else 0.0, device)
        context = self.clean_context(tokens)
        level = self.noise_level(self.student_gammas[j])
        z, _ = self.noised(x, level, known)
        first = (jd == 0)[:, None, None]
        with torch.no_grad():  # the teacher's two steps
            x0_t = self.estimate(self.teacher, z, level, known, x, first, context)
            a, b = self.teacher_steps[2 * jd].T[..., None, None]
            z_mid = torch.where(known[..., None], x, a * z + b * x0_t)
            x0_mid = self.teacher.predict_x0(z_mid, self.noise_level(self.teacher_gammas[2 * j + 1]), known,
                                             x0_t if self.config.self_cond else torch.zeros_like(z), context=context)[0]
            a2, b2 = self.teacher_steps[2 * jd + 1].T[..., None, None]
            z_end = a2 * z_mid + b2 * x0_mid
            A, B_ = self.student_steps[jd].T[..., None, None]
            target = torch.where((jd == N - 1)[:, None, None], x0_mid, (z_end - A * z) / B_)
        x0_hat = self.estimate(self, z, level, known, x, first, context)
        weight = (level.alpha / level.sigma).square().clamp(min=1.0)  # max(SNR, 1)
        loss = (weight * (x0_hat - target).square()).sum(-1)
        noised = ~known
        return (loss * noised).sum() / noised.sum().clamp(min=1)
