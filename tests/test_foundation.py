"""
Tests for the foundation: common, tokenizer, dataset, dataloader, tokenizer scripts.
"""

import collections
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import DummyWandb, UserError, check_writable, compute_init, init_wandb, peak_flops, run_main
from nanochat.dataloader import DataLoader
from nanochat.dataset import (MAX_SHARD, download, from_text, list_parquet_files, list_row_groups,
                              parquets_iter_batched, read_row_group, shard_name, text_iterator)
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]

TRICKY = [
    "", " ", "a", "hello world", "héllo wörld, café naïve façade",
    "日本語のテキスト、中文字符，한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "\ttabs\tand    runs   of     spaces   \n\n\n  trailing  ",
    "def f(x):\n    return x ** 2  # code\n\tif x != 0: print(f'{x!r}')\r\n",
    "numbers 1234567890 3.14159 -42 1e-9",
    "<|bos|> and <|pad|> as literal text",
    "zero\u200bwidth, combining e\u0301, nul \x00, bell \x07, rtl \u05e9\u05dc\u05d5\u05dd",
    "Ω≈ç√∫˜µ≤≥÷ ∀x∈ℝ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def random_unicode(rng, n):
    # any code point except surrogates (not encodable as UTF-8)
    cps = [rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]) for _ in range(n)]
    return "".join(map(chr, cps))

# -----------------------------------------------------------------------------
# common


def test_run_main_user_error(capsys):
    def bad():
        raise UserError("something is wrong; run: python -m scripts.fix")
    with pytest.raises(SystemExit) as e:
        run_main(bad)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: something is wrong; run: python -m scripts.fix\n"


def test_check_writable_names_the_flag(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("in the way")
    check_writable(tmp_path / "new" / "deeper", "--out_dir")  # missing folders are fine: they will be made
    check_writable(tmp_path / "new.json", "--output", kind="file")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # and nothing was made by checking
    with pytest.raises(UserError, match=r"^--out_dir .*/file/sub: .*/file is a file, not a folder"):
        check_writable(tmp_path / "file" / "sub", "--out_dir")
    with pytest.raises(UserError, match=r"^--tokenizer_dir .*/file: .*/file is a file, not a folder"):
        check_writable(tmp_path / "file", "--tokenizer_dir")
    with pytest.raises(UserError, match=r"^--output .* is a folder; give the name of a file"):
        check_writable(tmp_path, "--output", kind="file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only (root writes anywhere: simulated)
    with pytest.raises(UserError, match=r"^--checkpoint_dir .*/ckpt is not writable"):
        check_writable(tmp_path / "ckpt", "--checkpoint_dir")


def test_compute_init_wandb_flops():
    ddp, rank, local_rank, world_size, device = compute_init("cpu")
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, "cpu")
    with pytest.raises(UserError):
        compute_init("tpu")
    assert isinstance(init_wandb("dummy", 0, {}), DummyWandb)
    assert isinstance(init_wandb("real-run", 1, {}), DummyWandb)  # non-zero ranks never log
    assert peak_flops("cpu") > 1e8

# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    rng = random.Random(0)
    for s in TRICKY + [random_unicode(rng, 200) for _ in range(20)]:
        ids = tok.encode(s)
        assert all(0 <= i < tok.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)  # specials never from text
        assert tok.decode(ids) == s
    batch = tok.encode(TRICKY, prepend_bos=True)
    assert batch == [[tok.get_bos_token_id()] + tok.encode(s) for s in TRICKY]
    assert tok.decode(batch[5][1:]) == TRICKY[5]


def test_tokenizer_save_reload(tiny_tokenizer, tmp_path):
    tok, tok_dir = tiny_tokenizer
    tok2 = Tokenizer.from_directory(tok_dir)
    assert tok2.identity == tok.identity and len(tok.identity) == 64
    assert tok2.get_vocab_size() == tok.get_vocab_size() == 512
    assert (tok2.get_bos_token_id(), tok2.get_pad_token_id()) == (510, 511)
    for s in TRICKY:
        assert tok2.encode(s) == tok.encode(s)
    assert torch.equal(tok2.token_bytes(), tok.token_bytes())
    tok2.save(tmp_path / "again")  # saving is deterministic
    assert (tmp_path / "again/tokenizer.ranks").read_bytes() == (Path(tok_dir) / "tokenizer.ranks").read_bytes()
    assert not list(Path(tmp_path / "again").glob("*.tmp"))


def test_token_bytes(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (tok.get_vocab_size(),)
    assert tb[tok.get_bos_token_id()] == 0 and tb[tok.get_pad_token_id()] == 0
    assert tb[:256].eq(1).all() and tb[256:-2].ge(2).all()
    for s in TRICKY:
        assert tb[tok.encode(s)].sum().item() == len(s.encode("utf-8"))


def test_tokenizer_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train_from_iterator(iter(["abc"]), 257)
    with pytest.raises(UserError, match="python -m scripts.tok_train"):
        Tokenizer.from_directory(tmp_path / "nothing_here")
    # corrupt ranks file: identity mismatch is detected
    _, tok_dir = tiny_tokenizer
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(tok_dir).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer.ranks").write_text("garbage line\n")
    with pytest.raises(UserError, match="corrupt.*python -m scripts.tok_train"):
        Tokenizer.from_directory(bad)
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.from_directory(bad)

# -----------------------------------------------------------------------------
# dataset


def test_dataset_list_and_iter(tiny_data_dir):
    files = list_parquet_files(tiny_data_dir)
    assert len(files) >= 2 and files == sorted(files)
    train = list(parquets_iter_batched("train", tiny_data_dir))
    val = list(parquets_iter_batched("val", tiny_data_dir))
    n_train_rg = sum(pq.ParquetFile(f).num_row_groups for f in files[:-1])
    assert len(train) == n_train_rg and len(val) == pq.ParquetFile(files[-1]).num_row_groups
    assert all(isinstance(t, str) and t for batch in train + val for t in batch)
    assert sum(map(len, val)) == pq.read_table(files[-1]).num_rows


def test_dataset_errors(tmp_path):
    with pytest.raises(UserError, match=r"python -m nanochat.dataset -n 8.*--data_dir"):
        list_parquet_files(tmp_path / "missing")
    with pytest.raises(UserError, match="no .parquet files"):
        list_parquet_files(tmp_path)
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(UserError, match="at least 2"):
        list(parquets_iter_batched("train", tmp_path))
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "shard_00001.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        list(parquets_iter_batched("val", tmp_path))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "shard_00001.parquet")
    with pytest.raises(UserError, match=r"shard_00001.parquet: its 'text' column holds int64, not strings"):
        list(parquets_iter_batched("val", tmp_path))
    (tmp_path / "shard_00001.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="not a valid parquet"):
        list(parquets_iter_batched("val", tmp_path))


def test_an_empty_train_split_trains_no_tokenizer(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["some validation text"]}), tmp_path / "shard_00001.parquet")
    with pytest.raises(UserError, match=r"the train split of .* holds no text"):
        Tokenizer.train_from_iterator(text_iterator(tmp_path, 10**6, 1000), 300)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab_size", "300", "--data_dir", str(tmp_path),
                        "--tokenizer_dir", str(tmp_path / "tok")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: the train split of") and not (tmp_path / "tok").exists(), p.stderr


def test_from_text(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"Paragraph {i}: " + "word " * 50 + "é日😀" for i in range(60)), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"json doc {i} ünïcode"}) for i in range(30)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    paths = from_text([txt, jsonl], out, docs_per_shard=5, val_fraction=0.2, doc_chars=500, row_group_size=2)
    assert [Path(p).name for p in paths] == [shard_name(i) for i in range(len(paths))]
    train = [t for b in parquets_iter_batched("train", out) for t in b]
    val = [t for b in parquets_iter_batched("val", out) for t in b]
    assert val and train and val[-1] == "json doc 29 ünïcode"
    assert "".join(train).count("Paragraph") == 60
    assert not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="already contains parquet"):
        from_text([txt], out)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n\nmore".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        from_text([bad], tmp_path / "o2")
    with pytest.raises(UserError, match="does not exist"):
        from_text([tmp_path / "nope.txt"], tmp_path / "o3")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="no text"):
        from_text([tmp_path / "empty.txt"], tmp_path / "o4")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        from_text([tmp_path / "bad.jsonl"], tmp_path / "o5")


def parquet_bytes(texts):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()


def serve(files, fail_first=(), truncate=()):
    """Local HTTP server: 500 on the first request for names in fail_first; always a truncated body for truncate."""
    counts = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            counts[name] += 1
            if name not in files:
                return self.send_error(404)
            if name in fail_first and counts[name] == 1:
                return self.send_error(500)
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if name in truncate else body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counts


def test_download_retries(tmp_path):
    names = [shard_name(i) for i in (0, 1, 2, MAX_SHARD)]
    files = {n: parquet_bytes([f"{n} doc {j}" for j in range(5)]) for n in names}
    server, counts = serve(files, fail_first=set(names))
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        download(3, tmp_path, workers=2, retries=3, base_url=url, backoff=0.01)
        assert sorted(os.listdir(tmp_path)) == sorted(names)  # all present, no .tmp
        assert all(counts[n] == 2 for n in names)
        assert [Path(p).name for p in list_parquet_files(tmp_path)][-1] == shard_name(MAX_SHARD)
        assert read_row_group(str(tmp_path / shard_name(1)), 0)[0] == f"{shard_name(1)} doc 0"
        download(3, tmp_path, workers=2, retries=3, base_url=url, backoff=0.01)  # all present: no requests
        assert sum(counts.values()) == 8
    finally:
        server.shutdown()


def test_download_failure_leaves_nothing(tmp_path):
    names = [shard_name(i) for i in (0, 1, MAX_SHARD)]
    files = {n: parquet_bytes(["x" * 1000, "y" * 1000]) for n in names}
    server, counts = serve(files, truncate={shard_name(1)})
    try:
        with pytest.raises(UserError, match=r"1/3 shards failed.*shard_00001"):
            download(2, tmp_path, workers=2, retries=3, base_url=f"http://127.0.0.1:{server.server_port}", backoff=0.01)
        assert counts[shard_name(1)] == 3
        assert sorted(os.listdir(tmp_path)) == [shard_name(0), shard_name(MAX_SHARD)]
    finally:
        server.shutdown()

# -----------------------------------------------------------------------------
# dataloader


def token_stream(tok, data_dir, split, seed=0, epoch=0, rank=0, world_size=1):
    """The reference stream: row groups in epoch order, this rank's docs, BOS + tokens each."""
    rgs = list_row_groups(split, data_dir)
    order = list(range(len(rgs)))
    if split == "train":
        random.Random(seed * 1000 + epoch).shuffle(order)
    docs = [d for i in order for d in read_row_group(*rgs[i])[rank::world_size]]
    return [t for ids in tok.encode(docs, prepend_bos=True) for t in ids]


def test_dataloader_stream(tiny_tokenizer, tiny_data_dir):
    tok, _ = tiny_tokenizer
    B, T = 4, 64
    loader = DataLoader(tok, B, T, "train", data_dir=tiny_data_dir)
    xs = [next(loader) for _ in range(5)]
    assert all(x.shape == (B, T) and x.dtype == torch.long and x.device.type == "cpu" for x in xs)
    flat = torch.cat([x.flatten() for x in xs]).tolist()
    assert flat == token_stream(tok, tiny_data_dir, "train")[:len(flat)]  # blocks in order, no shift
    assert flat[0] == tok.get_bos_token_id() and flat.count(tok.get_bos_token_id()) >= 1
    # determinism, and a different seed gives a different order
    again = DataLoader(tok, B, T, "train", data_dir=tiny_data_dir)
    assert all(torch.equal(x, next(again)) for x in xs)
    other = DataLoader(tok, B, T, "train", data_dir=tiny_data_dir, seed=1)
    assert not all(torch.equal(x, next(other)) for x in xs)


def test_dataloader_resume(tiny_tokenizer, tiny_data_dir):
    tok, _ = tiny_tokenizer
    B, T = 8, 1000  # not a divisor of anything: blocks span documents and row groups
    loader = DataLoader(tok, B, T, "train", data_dir=tiny_data_dir, seed=3)
    batches, states = [], [loader.state_dict()]  # states[k] = state before batches[k]
    while sum(st["epoch"] >= 1 for st in states) < 5:  # run a few batches into epoch 1
        batches.append(next(loader))
        states.append(loader.state_dict())
        assert len(batches) < 10_000
    assert json.loads(json.dumps(states[-1])) == states[-1]
    assert any(st["token_offset"] > 0 and st["rg_pos"] > 0 for st in states)
    first_epoch1 = next(i for i, st in enumerate(states) if st["epoch"] >= 1)
    for k in sorted({1, 2, len(batches) // 2, first_epoch1 - 1, first_epoch1, len(batches) - 3}):
        resumed = DataLoader(tok, B, T, "train", data_dir=tiny_data_dir, seed=3, state=states[k])
        for j in range(k, min(k + 3, len(batches))):
            assert torch.equal(next(resumed), batches[j]), f"resume at batch {k} diverged at {j}"
    # epochs in sequence, each with its own permutation, blocks spanning the boundaries
    stream = [t for e in range(states[-1]["epoch"] + 1) for t in token_stream(tok, tiny_data_dir, "train", seed=3, epoch=e)]
    assert torch.cat([b.flatten() for b in batches]).tolist() == stream[:B * T * len(batches)]


def test_dataloader_val_finite(tiny_tokenizer, tiny_data_dir):
    tok, _ = tiny_tokenizer
    B, T = 2, 128
    loader = DataLoader(tok, B, T, "val", data_dir=tiny_data_dir)
    xs = list(loader)
    stream = token_stream(tok, tiny_data_dir, "val")
    assert len(xs) == len(stream) // (B * T) > 0
    assert torch.cat([x.flatten() for x in xs]).tolist() == stream[:len(xs) * B * T]
    with pytest.raises(StopIteration):
        next(loader)


def _ddp_worker(rank, world_size, port, data_dir, tok_dir, out_dir):
    import torch.distributed as dist
    from nanochat.common import compute_cleanup
    from nanochat.tokenizer import get_tokenizer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    ddp, r, _, w, device = compute_init("cpu")
    assert ddp and (r, w) == (rank, world_size) and dist.get_backend() == "gloo"
    tok = get_tokenizer(tok_dir)
    loader = DataLoader(tok, 1, 1, "val", data_dir=data_dir, rank=r, world_size=w, device=device)  # 1x1: nothing dropped
    stream = [x.item() for x in loader]
    bos = tok.get_bos_token_id()
    docs = [tok.decode(list(g)) for is_bos, g in itertools.groupby(stream, key=lambda t: t == bos) if not is_bos]
    assert stream.count(bos) == len(docs)
    total = torch.tensor([len(docs)])
    dist.all_reduce(total)
    Path(out_dir, f"rank{r}.json").write_text(json.dumps({"docs": docs, "total": total.item()}))
    compute_cleanup()


def test_dataloader_ddp_partition(tiny_tokenizer, tiny_data_dir, tmp_path):
    _, tok_dir = tiny_tokenizer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny_data_dir), str(tok_dir), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    all_docs = [d for b in parquets_iter_batched("val", tiny_data_dir) for d in b]
    assert r0["docs"] == all_docs[0::2] and r1["docs"] == all_docs[1::2]
    assert not set(r0["docs"]) & set(r1["docs"])
    assert sorted(r0["docs"] + r1["docs"]) == sorted(all_docs)
    assert r0["total"] == r1["total"] == len(all_docs)

# -----------------------------------------------------------------------------
# scripts


@pytest.mark.parametrize("cmd", [
    ["scripts.tok_train", "--data_dir", "/nonexistent"],
    ["scripts.tok_eval", "--tokenizer_dir", "/nonexistent"],
    ["nanochat.dataset", "--from_text", "/nonexistent.txt", "--out", "/tmp/never"],
])
def test_cli_user_error(cmd, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr


def test_tok_train_cli(tiny_data_dir, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "scripts.tok_train", "--vocab_size", "300", "--max_chars", "100000",
           "--data_dir", str(tiny_data_dir), "--tokenizer_dir", str(tmp_path / "tok")]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "val bytes/token" in p.stdout
    assert Tokenizer.from_directory(tmp_path / "tok").get_vocab_size() == 300
    (tmp_path / "file").write_text("in the way")
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "file" / "tok")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: --tokenizer_dir") and "is a file" in p.stderr, p.stderr
