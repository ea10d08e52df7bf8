"""
The user-facing scripts end to end on tiny checkpoints trained inside the test: diffusion_sample (prompt and
infill guarantees), diffusion_eval, diffusion_demo, the sample-quality metrics and bad-input handling.
Most runs call main() in-process (a subprocess costs seconds of imports); a few go through the real CLI.
"""

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from nanochat.checkpoint import save_model_file
from nanochat.common import UserError, run_main
from nanochat.diffusion_roberta import DiffusionConfig, DiffusionRoBERTa
from nanochat.gpt import GPT, GPTConfig
from nanochat.ngram import NGram
from nanochat.sample_quality import (
    distinct_n, judge_figures, load_judge, ratio_stderr, repetition_rate, sample_quality, unigram_entropy,
)
from nanochat.sampling import build_infill, generate, parse_infill
from nanochat.tokenizer import Tokenizer
from nanochat import train as trainer
from scripts import diffusion_demo, diffusion_eval, diffusion_sample
from tests.conftest import make_tiny_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tiny_data_dir, tiny_tokenizer, tmp_path_factory):
    """Tiny diffusion, gpt and masked checkpoints trained by the training script (depth 1, max_seq_len 32)."""
    _, tok_dir = tiny_tokenizer
    out = tmp_path_factory.mktemp("ckpts")
    for model in ("diffusion", "gpt", "masked"):
        trainer.main(["--model", model, "--depth=1", "--max_seq_len=32", "--device_batch_size=4",
                              "--num_iterations=20", "--eval_every=-1", "--eval_tokens=128", "--sample_every=0",
                              "--device_type=cpu", "--data_dir", str(tiny_data_dir), "--tokenizer_dir", str(tok_dir),
                              "--checkpoint_dir", str(out)])
    return {m: out / f"{m}_step_000020.pt" for m in ("diffusion", "gpt", "masked")}


def run_cli(module, *args, env=None, cwd=REPO):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr


def assert_fails_clearly(main, argv, capsys, message):
    """main(argv), run as a script runs: exit code 1 and one error line that says message."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert message in err, err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]

# -----------------------------------------------------------------------------
# sample quality metrics


def test_sample_quality_metrics():
    assert unigram_entropy([[1, 1, 2, 2], [3, 3, 3, 3]]) == pytest.approx(math.log(2) / 2)
    assert unigram_entropy([]) != unigram_entropy([])  # nan
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)  # 5 4-grams, one repeat
    assert repetition_rate([list(range(10))]) == 0.0
    assert repetition_rate([[7] * 10]) == pytest.approx(6 / 7)


def test_ngram_models_score_and_sample_with_the_rows_statistics():
    """Rows that always step w -> w + 1 (mod 50): the fitted bigram puts all its weight on the pairs, scores the
    chain at ~0 nats and samples it exactly from BOS (id 0); the unigram scores every token at its frequency."""
    rows = (torch.arange(40)[None, :] + 7 * torch.arange(30)[:, None]) % 50
    bigram, unigram = NGram.fit(rows, 2, 64), NGram.fit(rows, 1, 64)
    assert bigram.mix == 1.0
    test = (torch.arange(10)[None, :] + 3) % 50
    nats, targets = bigram.token_nll(test)
    assert torch.equal(targets, test[:, 1:]) and nats.max() < 1e-6
    freq = (torch.bincount(rows[:, 1:].flatten(), minlength=64).double() + 0.5)
    assert torch.allclose(unigram.token_nll(test)[0].double(), -(freq / freq.sum())[test[:, 1:]].log(), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    for sample in bigram.sample(4, 60, 0, g):
        assert sample == [i % 50 for i in range(1, 61)]
    # samples come from exactly the scored model: the smoothed frequencies (29.5 / 47 for token 5), the pairs mixed
    # with them, the frequencies alone after a token never seen with a successor (7)
    skewed = torch.tensor([[5] * 30 + [9] * 10])
    assert NGram(skewed, 2, 16, mix=0.5).token_nll(torch.tensor([[5, 7]]))[0].item() > 0  # an unseen pair keeps p > 0
    flat = NGram(skewed, 1, 16).sample(200, 10, 0, g)
    assert len(set(t for s in flat for t in s)) > 2 and abs(token_share(flat) - 29.5 / 47) < 0.03
    after_7 = [s[:1] for s in NGram(skewed, 2, 16).sample(2000, 1, 7, g)]
    assert abs(token_share(after_7) - 29.5 / 47) < 0.03
    after_5 = [s[:1] for s in NGram(skewed, 2, 16, mix=0.5).sample(2000, 1, 5, g)]  # 5 -> 5 in 29 of its 30 pairs
    assert abs(token_share(after_5) - (0.5 * 29 / 30 + 0.5 * 29.5 / 47)) < 0.03
    with pytest.raises(ValueError):
        NGram(rows, 3, 64)


def token_share(samples, token=5):
    """The share of token among all the samples' tokens."""
    return sum(t == token for s in samples for t in s) / sum(map(len, samples))


def test_generative_nll_and_judge_identity(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    V = tok.get_vocab_size()
    judge = GPT(GPTConfig(vocab_size=V, depth=1, max_seq_len=16)).eval()  # zero head: uniform predictions
    samples = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert judge_figures(judge, samples, bos_id=tok.get_bos_token_id())["gen_nll"] == pytest.approx(math.log(V), rel=1e-5)
    q = sample_quality(samples, judge, tok.get_bos_token_id())
    assert q["gen_ppl"] == pytest.approx(V, rel=1e-4) and sample_quality(samples)["gen_ppl"] is None
    assert q["gen_nll_stderr"] == pytest.approx(0, abs=1e-5)  # every token scored alike: no spread
    per_sample = torch.tensor([2.0, 3.0, 7.0])  # samples of equal length: the standard error of their mean
    assert ratio_stderr((per_sample * 4).tolist(), [4, 4, 4]) == pytest.approx((per_sample.std() / math.sqrt(3)).item())
    with pytest.raises(UserError, match="max_seq_len"):
        judge_figures(judge, [list(range(20))])
    save_model_file(str(tmp_path / "same.pt"), 0, judge, "gpt", tok)
    assert isinstance(load_judge(tmp_path / "same.pt", tok), GPT)
    other = Tokenizer.train_from_iterator(iter(["some other text entirely"] * 5), 300)
    save_model_file(str(tmp_path / "other.pt"), 0, GPT(GPTConfig(vocab_size=300, depth=1, max_seq_len=16)), "gpt", other)
    with pytest.raises(UserError, match="another tokenizer"):
        load_judge(tmp_path / "other.pt", tok)
    save_model_file(str(tmp_path / "diff.pt"), 0, DiffusionRoBERTa(DiffusionConfig(vocab_size=V, depth=1, max_seq_len=16)), "diffusion", tok)
    with pytest.raises(UserError, match="needs a gpt"):
        load_judge(tmp_path / "diff.pt", tok)

# -----------------------------------------------------------------------------
# sampling helpers


def test_parse_infill():
    assert parse_infill("a [BLANK:3] b[BLANK:1]") == ["a ", 3, " b", 1]
    for bad, msg in [("no gap here", "no gap"), ("x [BLANK:0] y", "at least one"), ("x [BLANK:] [BLANK:2]", "malformed"),
                     ("[BLANK:-3]", "malformed gap marker '[BLANK:-3]'"), ("a [BLANK:] b", "malformed gap marker '[BLANK:]'"),
                     ("a [BLANK: 3] b", "malformed gap marker '[BLANK: 3]'"), ("a [BLANK:4", "malformed gap marker '[BLANK:4'")]:
        with pytest.raises(UserError, match=re.escape(msg)):
            parse_infill(bad)


def test_progress_bar_counts_every_denoising_step(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    model = DiffusionRoBERTa(DiffusionConfig(vocab_size=tok.get_vocab_size(), depth=1, max_seq_len=16)).eval()
    seen = []
    bar = tqdm(total=3 * 4, file=io.StringIO())
    original_update = bar.update
    bar.update = lambda n=1: (seen.append(n), original_update(n))
    known, length, _ = build_infill(tok, "ab[BLANK:3]cd")
    ids = generate(model, 5, 16, known, batch_size=2, bar=bar, num_steps=4)
    assert ids.shape == (5, 16) and bar.n == 12 and seen.count(1) == 12  # 3 batches x 4 steps, one update per step
    assert all(ids[:, p].eq(t).all() for p, t in known.items())
    assert "predict_x0" not in model.__dict__  # the instance shadow is removed again

# -----------------------------------------------------------------------------
# diffusion_sample


def test_sample_cli_prompt_and_output(ckpts, tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    prompt = "KING: café, 東京!"
    out = tmp_path / "s.jsonl"
    p = run_cli("scripts.diffusion_sample", "--checkpoint", ckpts["diffusion"], "--num_samples", 3, "--seq_len", 24,
                "--num_steps", 8, "--batch_size", 2, "--prompt", prompt, "--output", out)
    assert p.returncode == 0, p.stderr
    assert "sampling" in p.stderr and "16/16" in p.stderr  # the bar: 2 batches x 8 steps
    records = read_jsonl(out)
    assert len(records) == 3
    prefix = [tok.get_bos_token_id()] + tok.encode(prompt)
    for r in records:
        printed = r["text"].replace("\r\n", "\n").replace("\r", "\n")  # as text-mode stdout reads it back
        assert r["text"].startswith(prompt) and printed in p.stdout
        assert r["tokens"][:len(prefix)] == prefix and len(r["tokens"]) == 24
        assert (r["prompt"], r["num_steps"], r["sampler"], r["temperature"], r["seed"]) == (prompt, 8, "ddpm", 1.0, 42)
        defaults = DiffusionRoBERTa.sampler_defaults
        assert (r["noise_scale"], r["score_temperature"]) == (defaults["noise_scale"], defaults["score_temperature"])


@pytest.mark.parametrize("sampler, clamp", [("ddpm", False), ("ddim", True)])
def test_sample_infill_keeps_known_text(ckpts, tiny_tokenizer, tmp_path, capsys, sampler, clamp):
    tok, _ = tiny_tokenizer
    template = "To be[BLANK:4] not to be:[BLANK:3] the question. 😀[BLANK:2]"
    pieces = ["To be", " not to be:", " the question. 😀"]
    out = tmp_path / "i.jsonl"
    diffusion_sample.main(["--checkpoint", str(ckpts["diffusion"]), "--num_samples", "3", "--num_steps", "6",
                           "--sampler", sampler, "--infill", template, "--output", str(out), "--temperature", "0.8"]
                          + ["--clamp"] * clamp)
    _, length, _ = build_infill(tok, template)
    for r in read_jsonl(out):
        assert len(r["tokens"]) == length  # default seq_len: the template's length
        pos = 0
        for piece in pieces:  # each known piece, unchanged and in order
            pos = r["text"].index(piece, pos) + len(piece)
        assert r["infill"] == template and r["sampler"] == sampler and r["clamp"] == clamp
    diffusion_sample.main(["--checkpoint", str(ckpts["diffusion"]), "--num_samples", "2", "--num_steps", "2",
                           "--infill", "A[BLANK:2]B", "--seq_len", "20", "--output", str(out)])
    assert all(len(r["tokens"]) == 20 and r["text"].startswith("A") for r in read_jsonl(out))  # free tail


def test_block_diffusion_scripts(tiny_data_dir, tiny_tokenizer, tmp_path, capsys):
    """A block-diffusion checkpoint from the training script: sampling goes block by block (the bar counts
    blocks x steps), keeps the prompt, refuses infilling; evaluation reports a bound and the context gain."""
    tok, tok_dir = tiny_tokenizer
    trainer.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--num_iterations=10", "--block_size=4",
                          "--eval_every=-1", "--eval_tokens=128", "--sample_every=-1", "--device_type=cpu",
                          "--data_dir", str(tiny_data_dir), "--tokenizer_dir", str(tok_dir), "--checkpoint_dir", str(tmp_path)])
    ckpt = tmp_path / "diffusion_step_000010.pt"
    out = tmp_path / "s.jsonl"
    p = run_cli("scripts.diffusion_sample", "--checkpoint", ckpt, "--num_samples", 2, "--seq_len", 16, "--num_steps", 3,
                "--prompt", "KING:", "--output", out)
    assert p.returncode == 0, p.stderr
    assert "blocks of 4 tokens left to right" in p.stdout and "12/12" in p.stderr  # 4 blocks x 3 steps
    assert all(r["text"].startswith("KING:") and len(r["tokens"]) == 16 for r in read_jsonl(out))
    p = run_cli("scripts.diffusion_sample", "--checkpoint", ckpt, "--infill", "A[BLANK:2]B")
    assert p.returncode == 1 and "whole-sequence diffusion model" in p.stderr
    assert_one_error_line(p.stderr)
    diffusion_eval.main(["--checkpoint", str(ckpt), "--data_dir", str(tiny_data_dir), "--eval_tokens", "128",
                         "--batch_size", "4", "--bound_samples", "2", "--num_samples", "2", "--sample_steps", "2",
                         "--throughput_steps", "1", "--output", str(tmp_path / "e.json")])
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["val"]["bpb"] > 0 and all(g["model_ce"] >= 0 for g in r["context_gain"])


def test_sample_verbatim_seed_command_and_gpt(ckpts, tiny_tokenizer, tmp_path, capsys):
    tok, _ = tiny_tokenizer
    wide = tmp_path / "wide.pt"  # an untrained model whose max_seq_len admits the seed's --seq_len 128
    save_model_file(str(wide), 0, DiffusionRoBERTa(DiffusionConfig(vocab_size=tok.get_vocab_size(), depth=1, max_seq_len=128)),
                    "diffusion", tok)
    diffusion_sample.main(["--checkpoint", str(wide), "--num_samples", "5", "--seq_len", "128", "--num_steps", "100"])
    assert capsys.readouterr().out.count("--- sample ") == 5
    diffusion_sample.main(["--checkpoint", str(ckpts["gpt"]), "--num_samples", "2", "--prompt", "KING:"])
    out = capsys.readouterr().out
    assert out.count("\nKING:") == 2 and "autoregressive" in out

def test_masked_model_scripts(ckpts, tiny_tokenizer, tiny_data_dir, tmp_path, capsys):
    """The masked model through the same scripts: a prompt and an infill template's text are kept token for token,
    the bar counts its steps, and diffusion_eval reports its bound."""
    tok, _ = tiny_tokenizer
    out = tmp_path / "s.jsonl"
    p = run_cli("scripts.diffusion_sample", "--checkpoint", ckpts["masked"], "--num_samples", 3, "--seq_len", 24,
                "--num_steps", 8, "--batch_size", 2, "--prompt", "KING: café", "--output", out)
    assert p.returncode == 0, p.stderr
    assert "16/16" in p.stderr and "8 ancestral unmasking steps" in p.stdout  # the bar: 2 batches x 8 steps
    prefix = [tok.get_bos_token_id()] + tok.encode("KING: café")
    assert all(r["tokens"][:len(prefix)] == prefix and r["text"].startswith("KING: café") for r in read_jsonl(out))
    template = "To be[BLANK:4] not to be:[BLANK:3] the question."
    diffusion_sample.main(["--checkpoint", str(ckpts["masked"]), "--num_samples", "3", "--num_steps", "6",
                           "--infill", template, "--output", str(out), "--temperature", "0.8"])
    known, length, _ = build_infill(tok, template)
    for r in read_jsonl(out):
        assert len(r["tokens"]) == length and all(r["tokens"][p] == w for p, w in known.items())
        assert r["num_steps"] == 6 and r["text"].startswith("To be") and r["text"].endswith(" the question.")
    diffusion_eval.main(["--checkpoint", str(ckpts["masked"]), "--data_dir", str(tiny_data_dir), "--eval_tokens", "256",
                         "--batch_size", "4", "--bound_samples", "4", "--num_samples", "2", "--sample_steps", "4",
                         "--throughput_steps", "1", "--judge", str(ckpts["gpt"]), "--output", str(tmp_path / "e.json")])
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["model_type"] == "masked" and r["nll_kind"] == "likelihood bound" and r["config"]["bound_samples"] == 4
    assert r["val"]["bpb"] > 0 and r["val"]["bpb_stderr"] > 0 and r["context_gain"] is None
    assert r["sampling"]["how"] == "4 ancestral unmasking steps" and r["sample_quality"]["gen_ppl"] > 0
    assert "validation bpb (likelihood bound)" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# diffusion_eval


def test_eval_diffusion_with_judge(ckpts, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    diffusion_eval.main(["--checkpoint", str(ckpts["diffusion"]), "--data_dir", str(tiny_data_dir), "--eval_tokens", "256",
                         "--batch_size", "4", "--bound_samples", "4", "--num_samples", "4", "--sample_steps", "8",
                         "--throughput_steps", "2", "--judge", str(ckpts["gpt"]), "--output", str(out)])
    screen = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["model_type"] == "diffusion" and r["val"]["tokens"] == 256 and not r["val"]["split_exhausted"]
    assert r["val"]["bpb"] > 0 and r["val"]["bpb_stderr"] > 0 and r["val"]["loss"] > 0
    assert r["train_throughput"]["tokens_per_s"] > 0 and r["sampling"]["tokens_per_s"] > 0 and r["sampling"]["num_steps"] == 8
    q = r["sample_quality"]
    assert 0 < q["unigram_entropy_nats"] <= math.log(31) and 0 < q["distinct_1"] <= 1 and 0 <= q["repetition_rate_4gram"] <= 1
    assert q["gen_ppl"] == pytest.approx(math.exp(q["gen_nll"])) and len(r["samples"]) == 4
    gains = r["context_gain"]
    c = DiffusionConfig()  # the checkpoint has the default range
    assert [g["gamma"] for g in gains] == pytest.approx(torch.linspace(c.gamma_min, c.gamma_max, 7).tolist())
    assert all(g["gain"] == pytest.approx(g["no_context_ce"] - g["model_ce"]) and g["model_ce"] >= 0 for g in gains)
    assert gains[-1]["no_context_ce"] > gains[0]["no_context_ce"]  # more noise, less known from the token alone
    for label in ("validation bpb (likelihood bound)", "training throughput", "sampling throughput", "distinct-1",
                  "generative perplexity", "context gain"):
        assert label in screen


def test_eval_verbatim_small_split_and_gpt(ckpts, tmp_path, capsys):
    data = make_tiny_shards(tmp_path / "data", num_shards=2, docs_per_group=4)  # a val split far below 2^20 tokens
    out = tmp_path / "eval.json"
    diffusion_eval.main(["--checkpoint", str(ckpts["diffusion"]), "--eval_tokens", "1048576", "--data_dir", str(data),
                         "--bound_samples", "2", "--sample_steps", "4", "--throughput_steps", "1", "--clamp", "--output", str(out)])
    screen = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["val"]["split_exhausted"] and 0 < r["val"]["tokens"] < 1048576
    assert r["sampling"]["clamp"] and "4 ddpm steps, noise x0.85, score temperature 0.9, clamped" in screen
    assert "the val split is smaller" in screen and "skipped (no --judge)" in screen
    assert r["sample_quality"]["gen_ppl"] is None and r["sampling"]["num_samples"] == 32
    diffusion_eval.main(["--checkpoint", str(ckpts["gpt"]), "--eval_tokens", "512", "--data_dir", str(data),
                         "--num_samples", "2", "--throughput_steps", "0", "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["model_type"] == "gpt" and r["sampling"]["how"] == "autoregressive" and r["train_throughput"] is None
    assert r["context_gain"] is None
    assert "validation bpb (exact)" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# diffusion_demo


def test_demo_cli(tmp_path):
    """No checkpoint and no tokenizer: trains a tiny BPE in-process, writes the PNG (into $NANOCHAT_BASE_DIR/demo,
    not the current folder), prints all four steps."""
    p = run_cli("scripts.diffusion_demo", "--train_steps", 3, "--num_steps", 6, cwd=tmp_path,
                env={"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    png = tmp_path / "base" / "demo" / "diffusion_demo_schedule.png"
    assert not (tmp_path / "diffusion_demo_schedule.png").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in p.stdout
    for marker in ("1. Noise schedules", "c = cosine", "2. Forward diffusion", "3. Training", "loss before",
                   "4. Reverse diffusion", "step    6/6", "final sample", "vocab 300"):
        assert marker in p.stdout, marker


def test_demo_with_checkpoint(ckpts, tmp_path, capsys):
    diffusion_demo.main(["--checkpoint", str(ckpts["diffusion"]), "--out_dir", str(tmp_path / "o"), "--num_steps", "5"])
    out = capsys.readouterr().out
    assert (tmp_path / "o" / "diffusion_demo_schedule.png").is_file()
    assert "step 20" in out and "loss before" in out and "training the fresh model" not in out and "final sample" in out

# -----------------------------------------------------------------------------
# bad input: one clear line on stderr, exit status 1, no traceback


@pytest.fixture(scope="module")
def bad_files(ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notckpt.pt").write_text("hello, I am not a checkpoint\n")
    data = ckpts["diffusion"].read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    ckpt = torch.load(ckpts["diffusion"], weights_only=True)
    torch.save({**ckpt, "format": "nanochat-diffusion/0"}, d / "oldformat.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "n_layer": 2}}, d / "newconfig.pt")
    return d


SAMPLE_BAD = [
    ({"--checkpoint": "{bad}/missing.pt"}, "no checkpoint"),
    ({"--checkpoint": "{bad}/notckpt.pt"}, "not a readable checkpoint"),
    ({"--checkpoint": "{bad}/truncated.pt"}, "not a readable checkpoint"),
    ({"--checkpoint": "{bad}/oldformat.pt"}, "another version of this code"),
    ({"--checkpoint": "{bad}/newconfig.pt"}, "does not match this version"),
    ({"--seq_len": "33"}, "larger than the model's maximum"),
    ({"--num_steps": "0"}, "num_steps must be an integer >= 1"),
    ({"--temperature": "0"}, "temperature must be finite and > 0"),
    ({"--temperature": "-1"}, "temperature must be finite and > 0"),
    ({"--temperature": "inf"}, "temperature must be finite and > 0"),
    ({"--sampler": "euler"}, "sampler must be one of"),
    ({"--noise_scale": "-0.1"}, "noise_scale must be finite and >= 0"),
    ({"--noise_scale": "inf"}, "noise_scale must be finite and >= 0"),
    ({"--score_temperature": "0"}, "score_temperature must be finite and > 0"),
    ({"--prompt": "word " * 40, "--seq_len": "16"}, "longer than --seq_len"),
    ({"--infill": "there is no gap here"}, "no gap"),
    ({"--infill": "x[BLANK:40]y"}, "longer than"),
    ({"--prompt": "a", "--infill": "b[BLANK:2]"}, "not both"),
    ({"--infill": "x [BLANK:-3] y"}, "malformed gap marker '[BLANK:-3]'"),
    ({"--seed": str(2**63)}, "--seed must be an integer in 0..2**63-1"),
    ({"--output": "{bad}/notckpt.pt/samples.jsonl"}, "notckpt.pt is a file, not a folder"),
    ({"--output": "{bad}"}, "is a folder; give the name of a file"),
]


@pytest.mark.parametrize("overrides, message", SAMPLE_BAD)
def test_sample_bad_input(ckpts, bad_files, capsys, overrides, message):
    args = {"--checkpoint": str(ckpts["diffusion"]), "--num_steps": "2", **overrides}
    argv = [s.format(bad=bad_files) for kv in args.items() for s in kv]
    assert_fails_clearly(diffusion_sample.main, argv, capsys, message)


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "{bad}/truncated.pt"], "not a readable checkpoint"),
    (["--sample_steps", "0"], "num_steps must be an integer >= 1"),
    (["--temperature", "0"], "temperature must be finite and > 0"),
    (["--sampler", "euler"], "sampler must be one of"),
    (["--score_temperature", "-1"], "score_temperature must be finite and > 0"),
    (["--sample_len", "64"], "larger than the model's maximum"),
    (["--judge", "{bad}/missing.pt"], "no checkpoint"),
    (["--judge", "{diffusion}"], "needs a gpt checkpoint"),
    (["--data_dir", "{bad}/nodata"], "does not exist"),
    (["--temperature", "inf"], "temperature must be finite and > 0"),
    (["--noise_scale", "inf"], "noise_scale must be finite and >= 0"),
    (["--seed", "-1"], "--seed must be an integer in 0..2**63-1"),
    (["--output", "{bad}/notckpt.pt/eval.json"], "--output"),
])
def test_eval_bad_input(ckpts, bad_files, capsys, extra, message):
    argv = ["--checkpoint", str(ckpts["diffusion"]), "--data_dir", str(bad_files)] + extra
    argv = [s.format(bad=bad_files, diffusion=ckpts["diffusion"]) for s in argv]
    assert_fails_clearly(diffusion_eval.main, argv, capsys, message)


@pytest.mark.parametrize("module, args, message", [
    ("scripts.diffusion_sample", ["--checkpoint", "{bad}/truncated.pt"], "not a readable checkpoint"),
    ("scripts.diffusion_sample", ["--checkpoint", "{diffusion}", "--sampler", "euler"], "sampler must be one of"),
    ("scripts.diffusion_sample", ["--checkpoint", "{gpt}", "--noise_scale", "0.5"], "has no sampler option noise_scale"),
    ("scripts.diffusion_eval", ["--checkpoint", "{gpt}", "--bound_samples", "4"], "has no likelihood bound"),
    ("scripts.diffusion_eval", ["--checkpoint", "{bad}/oldformat.pt"], "another version of this code"),
    ("scripts.diffusion_demo", ["--checkpoint", "{gpt}"], "needs a diffusion checkpoint"),
    ("scripts.diffusion_demo", ["--out_dir", "{bad}/notckpt.pt/plots"], "--out_dir"),
])
def test_cli_bad_input(ckpts, bad_files, tmp_path, module, args, message):
    """The same through the real command line: exit status 1, one line, no traceback."""
    args = [a.format(bad=bad_files, **ckpts) for a in args]
    p = run_cli(module, *args, env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert p.returncode == 1
    assert_one_error_line(p.stderr)
    assert message in p.stderr
