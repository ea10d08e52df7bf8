"""
Token block loader for a bidirectional (diffusion) model: each batch is (B, T) tokens, no input/target shift.

Every document gets a BOS prepended; a rank's documents are concatenated into one token stream,
which is cut into consecutive blocks of T tokens (blocks may span documents and row groups).
Rank r of W takes documents r, r+W, r+2W, ... of every row group, so ranks are disjoint and cover everything.
Train: row groups are visited in a per-epoch permutation from random.Random(seed * 1000 + epoch), forever.
Val: natural order, one pass, the final incomplete batch is dropped.
With label_column (attribute conditioning), each batch is (tokens, labels), both (B, T) int64: every token carries
the id in `labels` of its document's value of that column (BOS included; a row spanning two documents carries two
labels), len(labels) (the null label) where the value is missing or not in `labels`. Order and state are the same.
"""

import itertools
import random

import numpy as np
import torch

from nanochat.common import UserError
from nanochat.dataset import list_row_groups, read_row_group


class DataLoader:

    def __init__(self, tokenizer, batch_size, seq_len, split, data_dir=None, rank=0, world_size=1, seed=0,
                 device="cpu", state=None, label_column=None, labels=()):
        assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
        assert 0 <= rank < world_size, f"bad rank {rank} for world_size {world_size}"
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, seed
        self.device = torch.device(device)
        self.row_groups = list_row_groups(split, data_dir)
        state = state or {"epoch": 0, "rg_pos": 0, "token_offset": 0}
        # the next unread token is at token_offset within the tokens of row group order(epoch)[rg_pos]
        self.epoch, self.rg_pos, self.token_offset = int(state["epoch"]), int(state["rg_pos"]), int(state["token_offset"])
        self.label_column = label_column
        self.label_ids = {name: i for i, name in enumerate(labels)}
        self._tokens = None  # cached tokens of the current row group (this rank's documents); with labels, (2, N)

    def state_dict(self):
        return {"epoch": self.epoch, "rg_pos": self.rg_pos, "token_offset": self.token_offset}

    def _order(self, epoch):
        order = list(range(len(self.row_groups)))
        if self.split == "train":
            random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    def _load_tokens(self):
        path, index = self.row_groups[self._order(self.epoch)[self.rg_pos]]
        if not self.label_column:
            docs = read_row_group(path, index)[self.rank::self.world_size]
            return np.fromiter(itertools.chain.from_iterable(self.tokenizer.encode(docs, prepend_bos=True)), dtype=np.int64)
        docs, values = (column[self.rank::self.world_size] for column in read_row_group(path, index, self.label_column))
        ids = self.tokenizer.encode(docs, prepend_bos=True)
        null = len(self.label_ids)
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        labels = np.repeat(np.array([self.label_ids.get(v, null) for v in values], dtype=np.int64), [len(d) for d in ids])
        return np.stack([tokens, labels])

    def __iter__(self):
        return self

    def __next__(self):
        need = self.B * self.T
        parts = []
        need_at_last_wrap = None
        while need > 0:
            if self.rg_pos >= len(self.row_groups):  # end of epoch
                if self.split == "val":
                    raise StopIteration
                if need_at_last_wrap == need:
                    raise UserError(f"rank {self.rank}/{self.world_size}: the train split has no documents for this rank; add more data or use fewer ranks")
                need_at_last_wrap = need
                self.epoch, self.rg_pos, self.token_offset = self.epoch + 1, 0, 0
                continue
            if self._tokens is None:
                self._tokens = self._load_tokens()
            chunk = self._tokens[..., self.token_offset:self.token_offset + need]
            parts.append(chunk)
            need -= chunk.shape[-1]
            self.token_offset += chunk.shape[-1]
            if self.token_offset >= self._tokens.shape[-1]:  # row group exhausted: move on
                self.rg_pos, self.token_offset, self._tokens = self.rg_pos + 1, 0, None
        x = torch.from_numpy(np.concatenate(parts, axis=-1)).view(-1, self.B, self.T)  # (1 or 2, B, T)
        x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x.to(self.device)
        return (x[0], x[1]) if self.label_column else x[0]
