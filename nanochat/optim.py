"""
The optimisers: Muon (Keller Jordan, 2024; torch.optim.Muon) for the transformer's hidden matrices, whose update
for each 2-D matrix is SGD-momentum orthogonalised by a few Newton-Schulz iterations, and AdamW for everything else.
Under DDP the gradients are already averaged, so every rank computes the identical update.
"""

import torch

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
    # Keller Jordan's rate adjustment, max(1, rows / cols) ** 0.5, and no weight decay (torch's default is 0.1)
    muon = torch.optim.Muon(groups["matrix"], lr=lr["matrix_lr"], weight_decay=0.0, adjust_lr_fn="original")
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
