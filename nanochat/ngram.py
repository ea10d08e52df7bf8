"""
Count-based unigram and bigram models of token rows: the floor any neural model should clear.

scripts.compare reports both next to the GPT and the diffusion model: their validation bits per byte (through
evaluate_bpb, like the networks), and samples with exactly their statistics, judged like the networks' samples.
Counts are kept sparse (sorted (context, next) pair keys), so a 65536-token vocabulary costs no V x V table.
"""

import torch

MIX_GRID = [i / 10 for i in range(11)]  # bigram weights tried against the unigram when fitting


class NGram:
    """order 1: p(w) = token frequencies (add-half smoothing). order 2: p(w | v) = mix * count(v, w) / count(v, .)
    + (1 - mix) * p(w), the bigram interpolated with the unigram so that unseen pairs keep a probability."""

    def __init__(self, rows, order, vocab_size, mix=1.0):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        rows = rows.cpu()
        self.order, self.V, self.mix = order, vocab_size, mix if order == 2 else 0.0
        nxt = rows[:, 1:].flatten()
        counts = torch.bincount(nxt, minlength=vocab_size).double() + 0.5
        self.unigram = counts / counts.sum()
        ctx = rows[:, :-1].flatten() if order == 2 else torch.zeros_like(nxt)
        self.keys, counts = torch.unique(ctx * vocab_size + nxt, return_counts=True)  # each context's pairs are a run
        self.counts, self.key_ctx = counts.double(), self.keys // vocab_size
        self.context_counts = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, self.key_ctx, self.counts)

    @classmethod
    def fit(cls, rows, order, vocab_size, held_out=0.1):
        """The model of all rows, with the bigram weight that predicts the last held_out of the rows best when
        counted on the others."""
        if order == 1:
            return cls(rows, 1, vocab_size)
        split = max(1, int(len(rows) * (1 - held_out)))
        counted, held = rows[:split], rows[split:]
        if len(held) == 0:
            return cls(rows, 2, vocab_size)
        mix = min(MIX_GRID, key=lambda m: cls(counted, 2, vocab_size, m).token_nll(held)[0].mean().item())
        return cls(rows, 2, vocab_size, mix)

    def token_nll(self, tokens):
        """(nats (B, T-1), targets (B, T-1)): each token given the one before, the interface of evaluate_bpb."""
        prev, nxt = tokens[:, :-1].cpu(), tokens[:, 1:].cpu()
        p = self.unigram[nxt]
        if self.order == 2:
            key = prev * self.V + nxt
            i = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
            pair = torch.where(self.keys[i] == key, self.counts[i], 0.0)
            bigram = pair / self.context_counts[prev].clamp(min=1)
            p = torch.where(self.context_counts[prev] > 0, self.mix * bigram + (1 - self.mix) * p, p)
        return -p.log().float().to(tokens.device), tokens[:, 1:]

    def sample(self, num_samples, length, bos_id, generator=None):
        """num_samples lists of length token ids drawn from exactly the model that token_nll scores, the first one
        given BOS (the networks' samples start there too): order 1 by the smoothed frequencies; order 2 with
        probability mix from the pairs counted after the token before, else (and always after a token never seen
        with a successor) by the frequencies."""
        samples = []
        for _ in range(num_samples):
            token, sample = bos_id, []
            for _ in range(length):
                lo, hi = torch.searchsorted(self.key_ctx, torch.tensor([token, token + 1])).tolist()
                if lo < hi and torch.rand((), generator=generator) < self.mix:  # never for order 1: its mix is 0
                    token = int(self.keys[lo + torch.multinomial(self.counts[lo:hi], 1, generator=generator)]) % self.V
                else:
                    token = int(torch.multinomial(self.unigram, 1, generator=generator))
                sample.append(token)
            samples.append(sample)
        return samples
