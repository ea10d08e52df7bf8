"""
Where a diffusion checkpoint's training signal comes from, noise level by noise level: at each t, the training loss
(its cross-entropy part and its ELBO-weighted MSE part), the gradient norm, and the gradient's signal-to-noise ratio
across micro-batches (the norm of the mean gradient over the root-mean-square deviation from it). Every level sees
the same micro-batches with the same noise, so two checkpoints compare point by point (dev/LOG.md).

    python dev/gradient_noise.py --checkpoint /tmp/cmp_en8/diffusion/diffusion_step_001628.pt --data_dir ../shared/data/english/shards
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanochat.checkpoint import load_model  # noqa: E402
from nanochat.dataloader import DataLoader  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--checkpoint", required=True, help="a diffusion model file")
p.add_argument("--data_dir", required=True, help="the shards it was trained on (train split)")
p.add_argument("--micro_batches", type=int, default=6)
p.add_argument("--device_batch_size", type=int, default=4)
p.add_argument("--t", default="0.02,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.98", help="noise levels (t in [0, 1])")
args = p.parse_args()

model, tokenizer, _ = load_model(args.checkpoint, expect="diffusion")
model.train()
loader = DataLoader(tokenizer, args.device_batch_size, model.config.max_seq_len, "train", args.data_dir, seed=123)
batches = [next(loader).clone() for _ in range(args.micro_batches)]  # the loader reuses its buffer
params = [p for p in model.parameters() if p.requires_grad]
elbo_weight = model.config.elbo_weight
for t in (float(x) for x in args.t.split(",")):
    tt = torch.full((args.device_batch_size,), t, dtype=torch.float64)
    level = model.noise_level(*model.schedule.gamma_and_slope(tt))
    model.draw_noise = lambda batch_size, level=level: (level, False)  # every row at t, no self-conditioning pass
    grads, losses, ces = [], [], []
    for i, tokens in enumerate(batches):
        torch.manual_seed(i)
        model.config.elbo_weight = elbo_weight
        loss = model(tokens)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        losses.append(loss.item())
        torch.manual_seed(i)  # the same noise: the cross-entropy part of the same loss
        model.config.elbo_weight = 0.0
        with torch.no_grad():
            ces.append(model(tokens).item())
    G = torch.stack(grads)
    mean = G.mean(0)
    noise = (G - mean).pow(2).sum(1).mean().sqrt().item()
    n = len(batches)
    print(json.dumps(dict(t=t, gamma=round(model.schedule.gamma(tt)[0].item(), 2), loss=round(sum(losses) / n, 3),
                          ce=round(sum(ces) / n, 3), elbo_mse=round((sum(losses) - sum(ces)) / n, 3),
                          grad_norm=round(G.norm(dim=1).mean().item(), 3), mean_grad_norm=round(mean.norm().item(), 3),
                          snr=round(mean.norm().item() / noise, 3) if noise > 0 else None)), flush=True)
