"""
Sample quality of generated token sequences, shared by diffusion_eval and the model comparison.

A sample is a list of token ids (the generated part, without the BOS it was started from).
    unigram_entropy   mean over samples of the entropy of the sample's own token histogram, in nats;
                      low = repetitive (natural text of 1024 GPT-2 tokens is ~5.6 nats), which also fakes
                      a good generative perplexity, so report the two together
    distinct_n        unique n-grams / all n-grams, pooled over the samples (Li et al. 2016)
    repetition_rate   fraction of a sample's n-grams (default 4-grams) that already occurred earlier in the
                      same sample, pooled over the samples: 0 = no repeats, near 1 = loops
    judge_figures     mean nats per token of the samples under an autoregressive judge (a GPT checkpoint
                      with the same tokenizer), its standard error over the samples, and the generative
                      perplexity exp(nll); with context, of the continuation given a prompt (judged_nats:
                      per sample)
"""

import math
from collections import Counter

import torch
import torch.nn.functional as F

from nanochat.common import UserError


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def unigram_entropy(token_lists):
    """Mean per-sample unigram entropy in nats (empty samples are skipped; nan if all are empty)."""
    entropies = []
    for tokens in token_lists:
        if not tokens:
            continue
        counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
        p = counts / counts.sum()
        entropies.append(-(p * p.log()).sum().item())
    return sum(entropies) / len(entropies) if entropies else float("nan")


def distinct_n(token_lists, n):
    """Unique n-grams / total n-grams over all samples (nan if no sample has n tokens)."""
    grams = [g for tokens in token_lists for g in _ngrams(list(tokens), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(token_lists, n=4):
    """Fraction of n-grams that repeat an earlier n-gram of the same sample (nan if there are no n-grams)."""
    total = repeats = 0
    for tokens in token_lists:
        grams = _ngrams(list(tokens), n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else float("nan")


def load_judge(path, tokenizer, device="cpu"):
    """A GPT checkpoint to judge samples with; UserError unless it uses the samples' tokenizer."""
    from nanochat.checkpoint import load_model  # here, not at the top: checkpoint imports the models
    judge, _, ckpt = load_model(path, device, expect="gpt")
    if ckpt["tokenizer"]["identity"] != tokenizer.identity:
        raise UserError(f"judge {path} uses another tokenizer than the samples (identity "
                        f"{ckpt['tokenizer']['identity'][:12]} vs {tokenizer.identity[:12]}); "
                        f"train the judge with the same --tokenizer_dir")
    return judge


@torch.no_grad()
def judged_nats(judge, token_lists, bos_id=None, batch_size=32, context=0):
    """(summed nats, scored tokens) of each sample under the judge GPT. With bos_id, it is prepended so that every
    sample token is scored; without, each sample's first token is context only. The first `context` tokens of every
    sample are context only too (a prompt: the NLL of the continuation given it)."""
    device = judge.wte.weight.device
    rows = [([bos_id] if bos_id is not None else []) + list(t) for t in token_lists]
    first = context + 1 if bos_id is not None else max(context, 1)  # the index in a row of its first scored token
    longest, vocab = max(map(len, rows), default=0), judge.config.vocab_size
    if longest > judge.config.max_seq_len:
        raise UserError(f"samples of {longest} tokens (with BOS) are longer than the judge's max_seq_len "
                        f"{judge.config.max_seq_len}; use shorter samples")
    if any(not 0 <= i < vocab for r in rows for i in r):
        raise UserError(f"sample token ids fall outside the judge's vocabulary of {vocab}: another tokenizer?")
    nats, counts = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(2, max(map(len, chunk)))
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for j, r in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, first:len(r)] = True
        logits = judge.logits(ids[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(chunk), -1)
        nats += (nll * mask[:, 1:]).sum(1).tolist()
        counts += mask[:, 1:].sum(1).tolist()
    return nats, counts


def ratio_stderr(nats, counts):
    """The standard error of sum(nats) / sum(counts) over independent samples (the delta method; nan below two)."""
    n, mean = len(nats), sum(nats) / sum(counts) if sum(counts) else float("nan")
    if n < 2:
        return float("nan")
    spread = sum((x - mean * c) ** 2 for x, c in zip(nats, counts)) / (n - 1)
    return math.sqrt(spread / n) / (sum(counts) / n)


def judge_figures(judge, token_lists, bos_id=None, context=0):
    """gen_nll (mean nats per scored token, see judged_nats), its standard error over the samples, and gen_ppl."""
    nats, counts = judged_nats(judge, token_lists, bos_id, context=context)
    nll = sum(nats) / sum(counts) if sum(counts) else float("nan")
    return dict(gen_nll=nll, gen_nll_stderr=ratio_stderr(nats, counts), gen_ppl=math.exp(nll))


def sample_quality(token_lists, judge=None, bos_id=None):
    """All the metrics as one dict; gen_nll / gen_nll_stderr / gen_ppl are None without a judge."""
    out = dict(unigram_entropy_nats=unigram_entropy(token_lists), distinct_1=distinct_n(token_lists, 1),
               distinct_2=distinct_n(token_lists, 2), repetition_rate_4gram=repetition_rate(token_lists, 4),
               gen_nll=None, gen_nll_stderr=None, gen_ppl=None)
    return out | (judge_figures(judge, token_lists, bos_id) if judge is not None else {})
