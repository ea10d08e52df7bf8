"""
Pretraining data: a directory of parquet shards with one `text` column (and optionally more, e.g. a document's class
for attribute conditioning: read_row_group's label_column). The last shard (sorted by name) is the validation split,
all others are train.

    python -m nanochat.dataset -n 8                         # download 8 train shards + the val shard
    python -m nanochat.dataset --from_text a.txt b.jsonl --out DIR   # build shards from your own text
    python -m nanochat.dataset --tinyshakespeare            # TinyShakespeare into $NANOCHAT_BASE_DIR/tinyshakespeare/shards
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from multiprocessing.pool import ThreadPool

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import UserError, get_base_dir, run_main

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
BASE_URL = os.environ.get("NANOCHAT_DATA_URL", DEFAULT_BASE_URL)
MAX_SHARD = 1822  # the last shard of fineweb-edu-100b-shuffle, used as validation
DATA_HINT = "download data with: python -m nanochat.dataset -n 8 (or pass --data_dir pointing at a directory of parquet shards)"


def shard_name(i):
    return f"shard_{i:05d}.parquet"


def default_data_dir():
    return os.path.join(get_base_dir(), "base_data")

# -----------------------------------------------------------------------------
# reading


def list_parquet_files(data_dir=None):
    data_dir = str(data_dir or default_data_dir())
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist; {DATA_HINT}")
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if not files:
        raise UserError(f"no .parquet files in {data_dir}; {DATA_HINT}")
    return files


def split_files(split, data_dir=None):
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise UserError(f"need at least 2 parquet files in {os.path.dirname(files[0])} (train + val, the last one is val), found 1; {DATA_HINT}")
    return files[:-1] if split == "train" else files[-1:]


def open_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a valid parquet file ({e}); delete it and download/build it again") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{path} has no 'text' column (columns: {names}); shards need a string column named 'text'")
    text_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UserError(f"{path}: its 'text' column holds {text_type}, not strings; shards need a string column named 'text'")
    return pf


def list_row_groups(split, data_dir=None):
    """All (path, row_group_index) pairs of a split, in natural order."""
    return [(path, i) for path in split_files(split, data_dir) for i in range(open_parquet(path).num_row_groups)]


def read_row_group(path, index, label_column=None):
    """The texts of a row group; with label_column, (texts, labels): each document's value of that column as a string
    (None where it has none)."""
    pf = open_parquet(path)
    columns = ["text"] + ([label_column] if label_column else [])
    if label_column and label_column not in pf.schema_arrow.names:
        raise UserError(f"{path} has no {label_column!r} column for --label_column (its columns: {pf.schema_arrow.names})")
    try:
        table = pf.read_row_group(index, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"failed to read row group {index} of {path} ({e}); delete it and download/build it again") from None
    texts = table.column("text").to_pylist()
    if not label_column:
        return [t for t in texts if t is not None]
    labels = [None if v is None else str(v) for v in table.column(label_column).to_pylist()]
    kept = [(t, v) for t, v in zip(texts, labels) if t is not None]
    return [t for t, _ in kept], [v for _, v in kept]


def label_values(label_column, data_dir=None):
    """The sorted distinct values of label_column over the train split: a labelled model's label set."""
    values = {v for path, index in list_row_groups("train", data_dir) for v in read_row_group(path, index, label_column)[1]}
    values.discard(None)
    if not values:
        raise UserError(f"the {label_column!r} column of the train split holds no values: nothing to condition on")
    return sorted(values)


def parquets_iter_batched(split, data_dir=None):
    """Yields the list of texts of each row group of the split, in natural order."""
    for path, index in list_row_groups(split, data_dir):
        yield read_row_group(path, index)

# -----------------------------------------------------------------------------
# downloading



def text_iterator(data_dir, max_chars, doc_cap):
    """Documents of the train split, each cut to doc_cap characters, until max_chars have been read. A split without
    any text is a UserError: a tokenizer trained on nothing would have no merges."""
    nchars = 0
    for texts in parquets_iter_batched("train", data_dir):
        for doc in texts:
            doc = doc[:doc_cap]
            nchars += len(doc)
            yield doc
            if nchars >= max_chars:
                return
    if nchars == 0:
        raise UserError(f"the train split of {data_dir or default_data_dir()} holds no text (every shard but the last is "
                        f"empty): add documents, or build shards with python -m nanochat.dataset --from_text FILE... --out DIR")


def _check_parquet(path, n):
    with open(path, "rb") as f:  # parquet files start and end with b"PAR1"
        head = f.read(4)
        f.seek(max(0, n - 4))
        tail = f.read(4)
    if n < 8 or head != b"PAR1" or tail != b"PAR1":
        raise OSError("downloaded file is not parquet")


def _download_one(url, path, retries, backoff, check=_check_parquet, desc=None):
    """Returns None on success, else an error string. Never leaves a partial file at path or path.tmp.
    check(tmp_path, num_bytes) raises OSError on bad content; desc names a progress bar of the bytes (None: no bar)."""
    if os.path.exists(path):
        return None
    tmp = path + ".tmp"
    err = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                expected = r.headers.get("Content-Length")
                n = 0
                with tqdm(total=int(expected) if expected else None, desc=desc, disable=desc is None,
                          unit="B", unit_scale=True) as bar:
                    while chunk := r.read(1 << 16):
                        f.write(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
            if expected is not None and n != int(expected):
                raise OSError(f"truncated: got {n} of {expected} bytes")
            check(tmp, n)
            os.replace(tmp, path)
            return None
        except Exception as e:
            err = e
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                break  # permanent (e.g. 404), don't retry
            if attempt < retries - 1:
                time.sleep(backoff * 2**attempt)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return f"{os.path.basename(path)}: {err}"


def download(num_train_shards, data_dir=None, workers=4, retries=5, base_url=None, backoff=1.0):
    """Download train shards 0..n-1 (n=-1: all) plus the validation shard MAX_SHARD. Skips shards already present."""
    data_dir = str(data_dir or default_data_dir())
    base_url = (base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL).rstrip("/")
    n = MAX_SHARD if num_train_shards == -1 else num_train_shards
    if not 0 <= n <= MAX_SHARD:
        raise UserError(f"number of train shards must be in 0..{MAX_SHARD} (or -1 for all), got {num_train_shards}")
    os.makedirs(data_dir, exist_ok=True)
    ids = list(range(n)) + [MAX_SHARD]
    todo = [i for i in ids if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
    print(f"{len(ids) - len(todo)}/{len(ids)} shards already in {data_dir}, downloading {len(todo)} from {base_url}")
    job = lambda i: _download_one(f"{base_url}/{shard_name(i)}", os.path.join(data_dir, shard_name(i)), retries, backoff)
    errors = []
    with ThreadPool(max(1, workers)) as pool:
        for err in tqdm(pool.imap_unordered(job, todo), total=len(todo), desc="shards", unit="shard"):
            if err:
                errors.append(err)
    if errors:
        raise UserError(f"{len(errors)}/{len(todo)} shards failed after {retries} tries: {'; '.join(sorted(errors)[:5])}"
                        f"{' ...' if len(errors) > 5 else ''}; rerun the same command to resume")
    return data_dir

# -----------------------------------------------------------------------------
# building shards from your own text


def _read_docs(path, doc_chars):
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text ({e}); convert it first, e.g. iconv -t UTF-8") from None
    if path.endswith(".jsonl"):
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
                assert isinstance(doc, str)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string 'text' field") from None
            if doc:
                docs.append(doc)
    elif path.endswith(".txt"):
        # group blank-line-separated paragraphs (blank lines stripped) into documents of at least doc_chars
        docs, cur, size = [], [], 0
        for para in re.split(r"\n[ \t\r]*\n", text):
            if not para.strip():
                continue
            para = para.strip("\r\n")
            size += len(para) + (2 if cur else 0)  # the document's length: paragraphs joined by "\n\n"
            cur.append(para)
            if size >= doc_chars:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    else:
        raise UserError(f"{path}: unsupported file type, expected .txt or .jsonl")
    if not docs:
        raise UserError(f"{path} contains no text")
    return docs


def from_text(files, out_dir, docs_per_shard=10_000, val_fraction=0.1, doc_chars=2000, row_group_size=1024):
    """Turn .txt / .jsonl files into parquet shards; the last shard holds the last val_fraction of documents."""
    if not files:
        raise UserError("no input files given")
    docs = [doc for f in files for doc in _read_docs(f, doc_chars)]
    if len(docs) < 2:
        raise UserError(f"need at least 2 documents (train + val), got {len(docs)}; add more text")
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if any(f.endswith(".parquet") for f in os.listdir(out_dir)):
        raise UserError(f"{out_dir} already contains parquet files; pass an empty --out directory")
    n_val = min(len(docs) - 1, max(1, int(len(docs) * val_fraction)))
    train, val = docs[:-n_val], docs[-n_val:]
    shards = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]
    paths = []
    for i, shard in enumerate(shards):
        path = os.path.join(out_dir, shard_name(i))
        pq.write_table(pa.table({"text": shard}), path + ".tmp", row_group_size=row_group_size)
        os.replace(path + ".tmp", path)
        paths.append(path)
    print(f"wrote {len(train)} train + {len(val)} val documents into {len(shards)} shards in {out_dir}")
    return paths


# -----------------------------------------------------------------------------
# TinyShakespeare: the small corpus of speedrun.sh --cpu, for clones without ../shared


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_BYTES = 1115394
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
OFFLINE_HINT = ("offline, provide a folder of parquet shards (e.g. ../shared/data/tinyshakespeare/shards beside this "
                "clone): DATA_DIR=/path/to/shards bash speedrun.sh --cpu, or build one from your own text: "
                "python -m nanochat.dataset --from_text FILE... --out DIR")


def _check_file(path, n, size, sha256):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if n != size or digest != sha256:
        raise OSError(f"not the expected file: got {n} bytes with SHA-256 {digest[:16]}..., "
                      f"expected {size} bytes with SHA-256 {sha256[:16]}...")


def tinyshakespeare(out_dir=None, url=None, size=TINYSHAKESPEARE_BYTES, sha256=TINYSHAKESPEARE_SHA256, retries=3,
                    backoff=1.0):
    """Download TinyShakespeare to out_dir/input.txt (default $NANOCHAT_BASE_DIR/tinyshakespeare) and build
    out_dir/shards from it, the layout of ../shared/data/tinyshakespeare/shards (498 documents of >= 2000 characters,
    150 per shard in row groups of 64, the last 49 are val). Reuses both when present. Returns the shards folder."""
    out_dir = str(out_dir or os.path.join(get_base_dir(), "tinyshakespeare"))
    url = url or os.environ.get("TINYSHAKESPEARE_URL") or TINYSHAKESPEARE_URL
    shards = os.path.join(out_dir, "shards")
    if os.path.isdir(shards):
        return shards
    os.makedirs(out_dir, exist_ok=True)
    text = os.path.join(out_dir, "input.txt")
    if not os.path.exists(text):
        print(f"downloading TinyShakespeare from {url} to {text}")
    check = lambda path, n: _check_file(path, n, size, sha256)
    err = _download_one(url, text, retries, backoff, check=check, desc="input.txt")
    if err:
        raise UserError(f"could not download TinyShakespeare from {url} ({err}); nothing was saved; {OFFLINE_HINT}")
    tmp = shards + ".tmp"  # built aside, then renamed: an interrupted build leaves no partial shards folder
    shutil.rmtree(tmp, ignore_errors=True)
    from_text([text], tmp, docs_per_shard=150, row_group_size=64)
    os.replace(tmp, shards)
    return shards


def main():
    parser = argparse.ArgumentParser(description="Download pretraining shards or TinyShakespeare, or build shards from text files")
    parser.add_argument("-n", "--num_shards", type=int, default=None, help="number of train shards to download (-1 = all)")
    parser.add_argument("--data_dir", type=str, default=None, help="where to put the shards (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--from_text", type=str, nargs="+", default=None, help=".txt/.jsonl files to turn into shards")
    parser.add_argument("--tinyshakespeare", action="store_true", help="download TinyShakespeare and build its shards")
    parser.add_argument("--out", type=str, default=None,
                        help="output directory for --from_text, or for --tinyshakespeare (default: $NANOCHAT_BASE_DIR/tinyshakespeare)")
    parser.add_argument("--docs_per_shard", type=int, default=10_000)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args()
    if args.from_text:
        if not args.out:
            raise UserError("--from_text needs --out DIR")
        from_text(args.from_text, args.out, docs_per_shard=args.docs_per_shard, val_fraction=args.val_fraction)
    elif args.tinyshakespeare:
        print(f"TinyShakespeare shards in {tinyshakespeare(args.out)}")
    elif args.num_shards is not None:
        download(args.num_shards, args.data_dir, workers=args.workers)
    else:
        raise UserError("nothing to do: pass -n N to download, --tinyshakespeare, or --from_text FILE... --out DIR")


if __name__ == "__main__":
    run_main(main)
