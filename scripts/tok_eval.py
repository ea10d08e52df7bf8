"""
Compare bytes per token on the val split for trained tokenizers (and tiktoken's, when available offline).

    python -m scripts.tok_eval --tokenizer_dir /tmp/tok4096 --tokenizer_dir /tmp/tok8192 --data_dir DIR
"""

import argparse

import tiktoken

from nanochat.common import run_main
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import get_tokenizer


def bytes_per_token(encode_batch, data_dir):
    nbytes = ntokens = 0
    for texts in parquets_iter_batched("val", data_dir):
        nbytes += sum(len(t.encode("utf-8")) for t in texts)
        ntokens += sum(len(ids) for ids in encode_batch(texts))
    return nbytes / max(ntokens, 1)


def main():
    parser = argparse.ArgumentParser(description="Bytes per token on the val split")
    parser.add_argument("--tokenizer_dir", type=str, action="append", default=None,
                        help="trained tokenizer directory (repeatable; default: $NANOCHAT_BASE_DIR/tokenizer)")
    parser.add_argument("--data_dir", type=str, default=None, help="parquet shards (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--tiktoken", type=str, default="gpt2,cl100k_base", help="tiktoken encodings to compare ('' = none)")
    args = parser.parse_args()

    rows = []
    for d in args.tokenizer_dir or [None]:
        tok = get_tokenizer(d)
        rows.append((d or "default", tok.get_vocab_size(), bytes_per_token(tok.encode, args.data_dir)))
    for name in filter(None, args.tiktoken.split(",")):
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # needs internet or a cache; skip gracefully
            print(f"skipping tiktoken {name}: unavailable ({type(e).__name__})")
            continue
        rows.append((f"tiktoken:{name}", enc.n_vocab, bytes_per_token(enc.encode_ordinary_batch, args.data_dir)))

    width = max(len(r[0]) for r in rows)
    print(f"{'tokenizer':<{width}}  {'vocab':>7}  bytes/token")
    for name, vocab, bpt in rows:
        print(f"{name:<{width}}  {vocab:>7}  {bpt:.4f}")


if __name__ == "__main__":
    run_main(main)
