"""
Muon (Keller Jordan, 2024): SGD-momentum whose update for each 2-D matrix is orthogonalised by a few
Newton-Schulz iterations. Used for the transformer's hidden matrices; everything else uses AdamW.
Under DDP the gradients are already averaged, so every rank computes the identical update.
"""

import torch


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise G (the quintic iteration tuned for speed, not exact convergence)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()  # bf16 is fast on GPUs, slow on CPUs
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                g = zeropower_via_newtonschulz5(g, group["ns_steps"])
                p.add_(g, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


# learning rates per parameter group: nanochat's, for a GPT; a model class overrides some in its learning_rates
LEARNING_RATES = dict(matrix_lr=0.02, embedding_lr=0.2, head_lr=0.004, other_lr=0.004, mix_lr=0.02)


def learning_rates(model_cls):
    """The learning-rate defaults of a model class (the training flags' defaults)."""
    return {**LEARNING_RATES, **model_cls.learning_rates}


def setup_optimizers(model, weight_decay=0.0, **rates):
    """[AdamW, Muon] over the model's param_groups(), at its learning_rates updated by rates (matrix_lr=...).
    AdamW learning rates are scaled by 1/sqrt(width/768), as nanochat does, so that one set of defaults serves
    every depth."""
    lr = learning_rates(type(model)) | rates
    groups = model.param_groups()
    scale = (model.config.model_dim / 768) ** -0.5
    adam_groups = [dict(params=groups[name], lr=lr[f"{name}_lr"] * scale) for name in ("embedding", "head", "other", "mix")]
    adamw = torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = Muon(groups["matrix"], lr=lr["matrix_lr"])
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
