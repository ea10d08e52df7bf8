"""
Shared fixtures. Uses the tinyshakespeare shards from ../shared beside the repo when present,
else small generated shards in the same layout (set NANOCHAT_TEST_NO_SHARED=1 to force that).
"""

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.tokenizer import Tokenizer

# One thread per process: on a 2-core machine, tests that start several processes (torchrun, CLI runs)
# otherwise oversubscribe the cores and tiny matmuls get ~100x slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

SHAKESPEARE_DIR = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare"

WORDS = ("the of and to in is was for on that with as by at from his her they be this have had not are but "
         "king queen lord speak hear night day love death sword crown café naïve über 東京 データ 😀 λόγος").split()


def make_tiny_shards(out_dir, num_shards=4, row_groups=3, docs_per_group=10, seed=0):
    """Shards shard_00000..: text column, `row_groups` row groups each; the last shard (val) has one."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        groups = 1 if s == num_shards - 1 else row_groups
        docs = []
        for _ in range(groups * docs_per_group):
            lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".,!?:") for _ in range(rng.randint(5, 30))]
            docs.append(f"Doc {rng.randint(0, 10**6)}:\n" + "\n".join(lines))
        pq.write_table(pa.table({"text": docs}), out_dir / f"shard_{s:05d}.parquet", row_group_size=docs_per_group)
    return out_dir


@pytest.fixture(scope="session")
def shakespeare_dir():
    if os.environ.get("NANOCHAT_TEST_NO_SHARED") or not (SHAKESPEARE_DIR / "shards").is_dir():
        return None
    return SHAKESPEARE_DIR


@pytest.fixture(scope="session")
def tiny_data_dir(shakespeare_dir, tmp_path_factory):
    if shakespeare_dir is not None:
        return shakespeare_dir / "shards"
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data_dir, tmp_path_factory):
    from nanochat.dataset import parquets_iter_batched
    texts = (t for batch in parquets_iter_batched("train", tiny_data_dir) for t in batch)
    tok = Tokenizer.train_from_iterator(texts, 512)
    tok_dir = tmp_path_factory.mktemp("tokenizer")
    tok.save(tok_dir)
    return tok, tok_dir
