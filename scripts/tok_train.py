"""
Train the BPE tokenizer on the train split and save it.

    python -m scripts.tok_train --vocab_size 4096 --data_dir ../shared/data/tinyshakespeare/shards
"""

import argparse
import os
import time

from nanochat.common import check_writable, get_base_dir, run_main
from nanochat.dataset import parquets_iter_batched, split_files, text_iterator
from nanochat.tokenizer import Tokenizer


def bytes_per_token(tokenizer, data_dir):
    nbytes = ntokens = 0
    for texts in parquets_iter_batched("val", data_dir):
        nbytes += sum(len(t.encode("utf-8")) for t in texts)
        ntokens += sum(len(ids) for ids in tokenizer.encode(texts))
    return nbytes / max(ntokens, 1)


def main():
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer")
    parser.add_argument("--vocab_size", type=int, default=65536, help="including special tokens")
    parser.add_argument("--max_chars", type=int, default=2_000_000_000, help="max characters of training text")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="max characters per document")
    parser.add_argument("--data_dir", type=str, default=None, help="parquet shards (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="output (default: $NANOCHAT_BASE_DIR/tokenizer)")
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    check_writable(tokenizer_dir, "--tokenizer_dir")
    split_files("val", args.data_dir)  # fail fast on a bad data dir

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(args.data_dir, args.max_chars, args.doc_cap), args.vocab_size)
    print(f"trained tokenizer in {time.time() - t0:.2f}s, vocab_size {tokenizer.get_vocab_size()}")
    if tokenizer.get_vocab_size() < args.vocab_size:
        print(f"note: the data only supported {tokenizer.get_vocab_size()} of the {args.vocab_size} requested tokens")
    tokenizer.save(tokenizer_dir)
    print(f"saved to {tokenizer_dir} (identity {tokenizer.identity[:12]})")
    print(f"val bytes/token: {bytes_per_token(tokenizer, args.data_dir):.4f}")


if __name__ == "__main__":
    run_main(main)
