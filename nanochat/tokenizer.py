"""
BPE tokenizer in the nanochat style: train with rustbpe, run inference with tiktoken.

On disk (a directory):
    tokenizer.ranks      "base64(token_bytes) rank" per line, ordered by rank
    tokenizer.json       pattern, special tokens with ids, vocab_size, identity (sha256 of the ranks file)
    token_bytes.json     UTF-8 byte length of every token id (0 for special tokens), for bits-per-byte
"""

import base64
import hashlib
import json
import os

import rustbpe
import tiktoken
import torch

from nanochat.common import UserError, get_base_dir

# GPT-4 style split pattern, but numbers split into groups of 1-2 digits (as in nanochat)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = ["<|bos|>", "<|pad|>"]

FILES = ("tokenizer.ranks", "tokenizer.json", "token_bytes.json")


def _ranks_text(mergeable_ranks):
    items = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in items)


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class Tokenizer:

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        offset = len(mergeable_ranks)
        self.special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.pattern = pattern
        self._ranks = _ranks_text(mergeable_ranks)
        self.identity = hashlib.sha256(self._ranks.encode("utf-8")).hexdigest()
        self._token_bytes = [len(self.enc.decode_single_token_bytes(i)) for i in range(offset)] + [0] * len(SPECIAL_TOKENS)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise UserError(f"vocab_size {vocab_size} is too small: need at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(text_iterator, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        return cls(mergeable_ranks, tok.get_pattern())

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab_size": self.get_vocab_size(), "identity": self.identity}
        _write_atomic(os.path.join(directory, "tokenizer.ranks"), self._ranks)
        _write_atomic(os.path.join(directory, "token_bytes.json"), json.dumps(self._token_bytes))
        _write_atomic(os.path.join(directory, "tokenizer.json"), json.dumps(meta, indent=2))  # last: marks completion

    def to_dict(self):
        """Plain strings only: the tokenizer travels inside checkpoints (loadable with weights_only=True)."""
        return {"ranks": self._ranks, "pattern": self.pattern, "identity": self.identity}

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict(); ValueError when the ranks are damaged."""
        ranks = d["ranks"]
        if hashlib.sha256(ranks.encode("utf-8")).hexdigest() != d["identity"]:
            raise ValueError("identity does not match the ranks")
        mergeable_ranks = {}
        for line in ranks.splitlines():
            tok, rank = line.split()
            mergeable_ranks[base64.b64decode(tok, validate=True)] = int(rank)
        if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))) or len(mergeable_ranks) < 256:
            raise ValueError("ranks are not a contiguous 0..n-1 range covering all bytes")
        return cls(mergeable_ranks, d["pattern"])

    @classmethod
    def from_directory(cls, directory):
        directory = str(directory)
        missing = [f for f in FILES if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise UserError(f"no tokenizer in {directory} (missing {', '.join(missing)}); train one with: python -m scripts.tok_train")
        try:
            with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
                meta = json.load(f)
            with open(os.path.join(directory, "tokenizer.ranks"), encoding="utf-8") as f:
                tokenizer = cls.from_dict({"ranks": f.read(), "pattern": meta["pattern"], "identity": meta["identity"]})
            if tokenizer.special_tokens != meta["special_tokens"] or tokenizer.get_vocab_size() != meta["vocab_size"]:
                raise ValueError("special tokens / vocab_size do not match the ranks file")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"tokenizer in {directory} is corrupt ({e}); retrain it with: python -m scripts.tok_train") from None
        return tokenizer

    def encode(self, text, prepend_bos=False, num_threads=None):
        """str -> list[int]; list[str] -> list[list[int]]. Special-token strings in text are encoded as plain text."""
        bos = [self.get_bos_token_id()] if prepend_bos else []
        if isinstance(text, str):
            return bos + self.enc.encode_ordinary(text)
        num_threads = num_threads or min(8, os.cpu_count() or 1)
        return [bos + ids for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.special_tokens["<|bos|>"]

    def get_pad_token_id(self):
        return self.special_tokens["<|pad|>"]

    def token_bytes(self, device="cpu"):
        return torch.tensor(self._token_bytes, dtype=torch.long, device=device)


def get_tokenizer(tokenizer_dir=None):
    return Tokenizer.from_directory(tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))
