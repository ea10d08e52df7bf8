"""
Evaluation shared by training, diffusion_eval and compare: bits per byte (with a standard error) and the
mean training loss over validation batches, reduced over DDP ranks; and the unigram prior that the diffusion
model's context-gain table compares with (diffusion_eval).
"""

import math

import torch
import torch.distributed as dist


def _all_reduce_sum(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """Bits per byte over the batches: summed nats / (ln 2 * summed UTF-8 bytes) of the target tokens,
    special tokens (0 bytes) excluded from both, as nanochat does. Works for any model with token_nll():
    the diffusion model's likelihood bound or the GPT's exact NLL. Returns dict(bpb, stderr, tokens)."""
    stats = torch.zeros(6, dtype=torch.float64, device=token_bytes.device)  # n, b, n^2, b^2, n*b, rows
    tokens_seen = 0
    for tokens in batches:
        nats, targets = model.token_nll(tokens)
        nbytes = token_bytes[targets]
        n = (nats.double() * (nbytes > 0)).sum(1)
        b = nbytes.double().sum(1)
        stats += torch.stack([n.sum(), b.sum(), (n * n).sum(), (b * b).sum(), (n * b).sum(), torch.tensor(float(len(n)), device=n.device)])
        tokens_seen += targets.numel()
    count = torch.tensor([float(tokens_seen)], dtype=torch.float64, device=stats.device)
    sn, sb, snn, sbb, snb, rows = _all_reduce_sum(stats).tolist()
    tokens_seen = int(_all_reduce_sum(count).item())
    if sb == 0:
        return dict(bpb=float("nan"), stderr=float("nan"), tokens=tokens_seen)
    ratio = sn / sb  # nats per byte; its standard error by the ratio-estimator formula over rows
    residual_ss = max(snn - 2 * ratio * snb + ratio**2 * sbb, 0.0)
    stderr = math.sqrt(residual_ss / (rows * (rows - 1))) / (sb / rows) if rows > 1 else float("nan")
    return dict(bpb=ratio / math.log(2), stderr=stderr / math.log(2), tokens=tokens_seen)


@torch.no_grad()
def evaluate_loss(model, batches):
    """Mean training loss over the batches (the model in eval mode), averaged over ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for tokens in batches:
        total += torch.tensor([model(tokens).item(), 1.0], dtype=torch.float64, device=total.device)
    total = _all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def unigram_log_prior(batches, vocab_size):
    """Log token frequencies (add-half smoothing) over the batches: the best context-free prediction."""
    counts = torch.full((vocab_size,), 0.5, dtype=torch.float64)
    for tokens in batches:
        counts += torch.bincount(tokens.flatten().cpu(), minlength=vocab_size).double()
    return (counts / counts.sum()).log().float()
