"""TinyShakespeare fetch (nanochat.dataset.tinyshakespeare, --tinyshakespeare, speedrun.sh --cpu without ../shared)
against a local HTTP server on 127.0.0.1: a good file builds shards in the layout of ../shared; a dropped
connection, a 404 or a corrupt file leave nothing behind and end in one clear UserError."""
import collections
import hashlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import (TINYSHAKESPEARE_BYTES, TINYSHAKESPEARE_SHA256, parquets_iter_batched, split_files,
                              tinyshakespeare)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_text(shakespeare_dir):
    """The real input.txt from ../shared, or None."""
    path = shakespeare_dir / "input.txt" if shakespeare_dir is not None else None
    return path.read_bytes() if path is not None and path.is_file() else None


@pytest.fixture(scope="module")
def good_text(real_text):
    """(bytes, size, sha256) of the file to serve: the real text when ../shared has it, else a small generated one."""
    if real_text is not None:
        return real_text, TINYSHAKESPEARE_BYTES, TINYSHAKESPEARE_SHA256
    rng = random.Random(0)
    words = "thou art my lord and king the crown of night café naïve 東京 😀".split()
    speeches = [f"SPEAKER {i % 7}:\n" + "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                                                 for _ in range(rng.randint(1, 12))) for i in range(300)]
    body = ("\n\n".join(speeches) + "\n").encode("utf-8")
    return body, len(body), hashlib.sha256(body).hexdigest()


@pytest.fixture()
def server(good_text):
    """/input.txt: the good file; /drop.txt: the connection closes halfway; /corrupt.txt: one byte changed;
    /binary.txt: random bytes of the same size; anything else 404. Yields (base url, request counts)."""
    body = good_text[0]
    files = {"input.txt": body, "drop.txt": body, "corrupt.txt": body[:100] + b"#" + body[101:],
             "binary.txt": random.Random(1).randbytes(len(body))}
    counts = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            counts[name] += 1
            if name not in files:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[name])))
            self.end_headers()
            self.wfile.write(files[name][:len(body) // 2] if name == "drop.txt" else files[name])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", counts
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(out, url, good_text):
    _, size, sha256 = good_text
    return tinyshakespeare(out, url=url, size=size, sha256=sha256, retries=2, backoff=0)


def paragraphs(text):
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def test_constants_match_the_shared_text(real_text):
    if real_text is None:
        pytest.skip("no ../shared/data/tinyshakespeare/input.txt")
    assert len(real_text) == TINYSHAKESPEARE_BYTES
    assert hashlib.sha256(real_text).hexdigest() == TINYSHAKESPEARE_SHA256
    assert real_text.decode("utf-8").startswith("First Citizen:")


def test_fetch_builds_shards(server, good_text, real_text, shakespeare_dir, tmp_path):
    url, counts = server
    out = tmp_path / "ts"
    shards = Path(fetch(out, f"{url}/input.txt", good_text))
    assert shards == out / "shards" and sorted(os.listdir(out)) == ["input.txt", "shards"]
    assert (out / "input.txt").read_bytes() == good_text[0]
    assert not [f for f in os.listdir(shards) if not f.endswith(".parquet")]
    train, val = split_files("train", shards), split_files("val", shards)
    assert len(train) >= 1 and len(val) == 1
    docs = [d for split in ("train", "val") for batch in parquets_iter_batched(split, shards) for d in batch]
    assert paragraphs("\n\n".join(docs)) == paragraphs(good_text[0].decode("utf-8"))
    if real_text is not None:  # the same shards as ../shared: file names, texts, row groups
        shared = shakespeare_dir / "shards"
        assert os.listdir(shards) and sorted(os.listdir(shards)) == sorted(os.listdir(shared))
        for name in os.listdir(shared):
            ours, theirs = pq.ParquetFile(shards / name), pq.ParquetFile(shared / name)
            assert ours.read().column("text").to_pylist() == theirs.read().column("text").to_pylist(), name
            assert ([ours.metadata.row_group(i).num_rows for i in range(ours.num_row_groups)] ==
                    [theirs.metadata.row_group(i).num_rows for i in range(theirs.num_row_groups)]), name
    assert fetch(out, f"{url}/input.txt", good_text) == str(shards)  # reused: no second request
    assert counts["input.txt"] == 1


@pytest.mark.parametrize("name, error", [("drop.txt", "truncated|IncompleteRead"), ("missing.txt", "404")])
def test_failed_download_leaves_nothing(server, good_text, tmp_path, name, error):
    url, counts = server
    out = tmp_path / "ts"
    with pytest.raises(UserError) as e:
        fetch(out, f"{url}/{name}", good_text)
    message = str(e.value)
    assert message.startswith(f"could not download TinyShakespeare from {url}/{name}") and re.search(error, message)
    assert "DATA_DIR=" in message and "bash speedrun.sh --cpu" in message and "--from_text FILE... --out DIR" in message
    assert os.listdir(out) == []
    assert counts[name] == (1 if name == "missing.txt" else 2)  # a 404 is not retried


def test_refused_connection(good_text, tmp_path):
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        with pytest.raises(UserError, match="could not download TinyShakespeare.*DATA_DIR="):
            fetch(tmp_path / "ts", f"http://127.0.0.1:{s.getsockname()[1]}/input.txt", good_text)
    assert os.listdir(tmp_path / "ts") == []


@pytest.mark.parametrize("name", ["corrupt.txt", "binary.txt"])
def test_corrupt_file_rejected(server, good_text, tmp_path, name):
    url, _ = server
    out = tmp_path / "ts"
    with pytest.raises(UserError, match=rf"^could not download TinyShakespeare from {url}/{name} \(input.txt: not the "
                                        rf"expected file: got {good_text[1]} bytes .*expected {good_text[1]} bytes "
                                        rf"with SHA-256 {good_text[2][:16]}.*nothing was saved"):
        fetch(out, f"{url}/{name}", good_text)
    assert os.listdir(out) == []


def run_cli(args, env, cwd=REPO):
    env = {**{k: v for k, v in os.environ.items() if k != "DATA_DIR"}, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_offline_message(server, tmp_path):
    url, _ = server
    p = run_cli([sys.executable, "-m", "nanochat.dataset", "--tinyshakespeare", "--out", str(tmp_path / "ts")],
                {"TINYSHAKESPEARE_URL": f"{url}/missing.txt"})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download TinyShakespeare"), p.stderr
    assert "DATA_DIR=" in lines[0] and "--from_text" in lines[0]
    assert os.listdir(tmp_path / "ts") == []


def speedrun_copy(tmp_path):
    """speedrun.sh in a clone without ../shared beside it (the package from this checkout, via PYTHONPATH)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "speedrun.sh", clone / "speedrun.sh")
    return ["bash", str(clone / "speedrun.sh"), "--cpu"], {
        "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "PYTHONPATH": str(REPO),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def test_speedrun_without_shared_offline(server, tmp_path):
    url, _ = server
    cmd, env = speedrun_copy(tmp_path)
    p = run_cli(cmd, {**env, "TINYSHAKESPEARE_URL": f"{url}/missing.txt"}, cwd=tmp_path)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not download TinyShakespeare from {url}"), p.stderr
    assert "DATA_DIR=/path/to/shards bash speedrun.sh --cpu" in lines[0]
    assert "python -m nanochat.dataset --from_text FILE... --out DIR" in lines[0]
    assert os.listdir(tmp_path / "base" / "tinyshakespeare") == []
    assert not (tmp_path / "base" / "speedrun_cpu").exists()  # stopped before any stage


def test_speedrun_missing_data_dir(server, tmp_path):
    url, counts = server
    cmd, env = speedrun_copy(tmp_path)
    p = run_cli(cmd, {**env, "DATA_DIR": str(tmp_path / "nowhere"), "TINYSHAKESPEARE_URL": f"{url}/input.txt"},
                cwd=tmp_path)
    assert p.returncode == 1 and f"no data at DATA_DIR={tmp_path / 'nowhere'};" in p.stderr
    assert sum(counts.values()) == 0  # a DATA_DIR that is set is never replaced by a fetch


def test_speedrun_without_shared_fetches_once(server, real_text, tmp_path):
    if real_text is None:
        pytest.skip("the CLI checks the real TinyShakespeare hash: needs ../shared/data/tinyshakespeare/input.txt")
    url, counts = server
    cmd, env = speedrun_copy(tmp_path)
    env = {**env, "TINYSHAKESPEARE_URL": f"{url}/input.txt", "SPEEDRUN_VOCAB": "1"}  # the tokenizer stage fails at once
    shards = tmp_path / "base" / "tinyshakespeare" / "shards"
    for _ in range(2):
        p = run_cli(cmd, env, cwd=tmp_path)
        assert p.returncode == 1 and "vocab_size 1 is too small" in p.stderr, p.stderr
        assert f"data {shards}," in p.stdout
    assert len(split_files("train", shards)) == 3 and counts["input.txt"] == 1
