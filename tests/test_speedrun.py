"""speedrun.sh --cpu end to end with the tiniest settings (environment overrides), in a temporary NANOCHAT_BASE_DIR:
every stage runs and leaves its artefacts (tokenizer, both checkpoints at equal FLOPs, reports, eval JSON, samples)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = dict(SPEEDRUN_VOCAB="512", SPEEDRUN_DEPTH="1", SPEEDRUN_ITERS="5", SPEEDRUN_SEQ_LEN="32", SPEEDRUN_BATCH="4",
            SPEEDRUN_EVAL_TOKENS="256", SPEEDRUN_BOUND_SAMPLES="2", SPEEDRUN_NUM_SAMPLES="2", SPEEDRUN_SAMPLE_STEPS="4")


def speedrun(tmp_path, *args, timeout=300, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env}
    return subprocess.run(["bash", str(REPO / "speedrun.sh"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_speedrun_cpu_end_to_end(tiny_data_dir, tmp_path):
    p = speedrun(tmp_path, "--cpu", DATA_DIR=str(tiny_data_dir), **TINY)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run = tmp_path / "base" / "speedrun_cpu"
    ckpts = run / "checkpoints"
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    # both models trained, the GPT for the diffusion model's training FLOPs (same tokens per step)
    diffusion, tok, _ = load_model(str(ckpts / "diffusion_step_000005.pt"))
    gpt_files = sorted(f for f in ckpts.glob("gpt_step_*.pt") if ".state_" not in f.name)
    assert len(gpt_files) == 1
    gpt, gpt_tok, gpt_ckpt = load_model(str(gpt_files[0]))
    assert tok.identity == gpt_tok.identity and diffusion.config.depth == gpt.config.depth == 1
    assert gpt_ckpt["step"] == round(5 * diffusion.flops_per_token() / gpt.flops_per_token()) > 5
    for name in ("report.md", "report_gpt.md", "diffusion_curves.png", "gpt_curves.png"):
        assert (ckpts / name).stat().st_size > 0, name
    assert "## Final evaluation" in (ckpts / "report.md").read_text()

    # evaluation of both checkpoints, samples judged by the GPT
    for name, kind in (("eval_diffusion.json", "diffusion"), ("eval_gpt.json", "gpt")):
        r = json.loads((run / name).read_text())
        assert r["model_type"] == kind and r["val"]["bpb"] > 0 and r["sample_quality"]["gen_ppl"] > 1
        assert r["sample_quality"]["judge"] == str(gpt_files[0]) and len(r["samples"]) == 2
    for name in ("samples.jsonl", "samples_gpt.jsonl"):
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert len(rows) == 4 and all(len(r["tokens"]) == 32 for r in rows)

    times = (run / "times.txt").read_text()
    for stage in ("tokenizer", "diffusion training (5 steps)", "GPT training", "evaluation", "samples", "total"):
        assert re.search(rf"^{re.escape(stage)}.* \d+ s$", times, re.M), times
    assert "val bpb" in p.stdout and "upper bound" in p.stdout


def test_speedrun_bad_invocations(tmp_path):
    p = speedrun(tmp_path, SPEEDRUN_CPU="1", DATA_DIR=str(tmp_path / "nowhere"), timeout=60)
    assert p.returncode == 1 and "no data at" in p.stderr and "../shared" in p.stderr
    p = speedrun(tmp_path, "--gpu", timeout=60)
    assert p.returncode == 2 and "unknown argument --gpu" in p.stderr
    p = speedrun(tmp_path, "--help", timeout=60)
    assert p.returncode == 0 and "--cpu" in p.stdout and "ESTIMATES" in p.stdout
