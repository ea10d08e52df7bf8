"""
Which label (a document's class, e.g. its source) does a token sequence read like? Naive Bayes over token bigrams,
the measure of attribute-conditioned samples (scripts.guidance_eval): the share of samples asked for label L that
it assigns to L, next to its own accuracy on validation text cut to the samples' length.

For each label, a bigram model of the train split's documents of that label (nanochat.ngram.NGram: the bigram
interpolated with the label's unigram, the weight fitted on held-out rows, so that unseen pairs keep a probability);
a sequence goes to the label with the largest log prior + total log-likelihood of its tokens, each given the one
before. The prior is each label's share of the training tokens.
"""

import math

import torch

from nanochat.dataset import list_row_groups, read_row_group
from nanochat.ngram import NGram


def labelled_documents(tokenizer, split, label_column, data_dir=None):
    """[(token ids with BOS first, label)] of the split's documents that have a value in label_column."""
    docs = []
    for path, index in list_row_groups(split, data_dir):
        texts, labels = read_row_group(path, index, label_column)
        kept = [(t, l) for t, l in zip(texts, labels) if l is not None]
        ids = tokenizer.encode([t for t, _ in kept], prepend_bos=True)
        docs += [(i, l) for i, (_, l) in zip(ids, kept)]
    return docs


def chunks(docs, length):
    """(rows (N, length), labels [N]): every whole run of length tokens of each document, one after the other (the
    first starting with the document's BOS, as a sample starts), none across documents."""
    rows, labels = [], []
    for ids, label in docs:
        for start in range(0, len(ids) - length + 1, length):
            rows.append(ids[start:start + length])
            labels.append(label)
    return torch.tensor(rows, dtype=torch.long).view(-1, length), labels


class LabelClassifier:

    def __init__(self, models, log_prior):
        self.models = models  # {label: NGram}, labels sorted
        self.labels = list(models)
        self.log_prior = log_prior  # (num labels,)

    @classmethod
    def fit(cls, docs, vocab_size, row_len=128):
        """The classifier of [(token ids, label)] documents: each label's documents in one stream, cut into rows of
        row_len tokens (fewer for a short stream: at least 10 rows, the last for fitting the bigram weight) for
        NGram.fit (a pair across a cut is lost: 1 in row_len)."""
        streams = {}
        for ids, label in docs:
            streams.setdefault(label, []).extend(ids)
        if len(streams) < 2:
            raise ValueError(f"a label classifier needs documents of at least 2 labels, got {sorted(streams)}")
        models, counts = {}, []
        for label in sorted(streams):
            stream = streams[label]
            length = max(2, min(row_len, len(stream) // 10))
            n = len(stream) // length
            rows = torch.tensor(stream[:n * length], dtype=torch.long).view(n, length)
            models[label] = NGram.fit(rows, 2, vocab_size)
            counts.append(len(stream))
        counts = torch.tensor(counts, dtype=torch.float64)
        return cls(models, (counts / counts.sum()).log())

    def scores(self, rows):
        """(N, num labels) log prior + log-likelihood of each (N, T) row under each label's model."""
        nll = torch.stack([m.token_nll(rows)[0].double().sum(1) for m in self.models.values()], dim=1)
        return self.log_prior - nll.cpu()

    def classify(self, rows):
        """The most likely label of each (N, T) row."""
        return [self.labels[i] for i in self.scores(rows).argmax(1).tolist()]

    def accuracy(self, rows, labels):
        """dict(accuracy, stderr, balanced (the mean of the per-label accuracies), per_label {label: accuracy},
        count {label: rows}) of the classification of (N, T) rows whose true labels are given."""
        hits = [p == t for p, t in zip(self.classify(rows), labels)]
        return accuracy_summary(hits, labels)


def accuracy_summary(hits, labels):
    """The accuracy of hits (bools) with its binomial standard error, overall and by label."""
    n = len(hits)
    acc = sum(hits) / n if n else float("nan")
    per_label = {l: [h for h, k in zip(hits, labels) if k == l] for l in sorted(set(labels))}
    per_label_acc = {l: sum(h) / len(h) for l, h in per_label.items()}
    return dict(accuracy=acc, stderr=math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
                balanced=sum(per_label_acc.values()) / len(per_label_acc) if per_label_acc else float("nan"),
                per_label=per_label_acc, count={l: len(h) for l, h in per_label.items()})
