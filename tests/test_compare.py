"""scripts.bench (throughput side by side) and scripts.compare (diffusion vs GPT at equal compute), end to end."""
import json
import os
import shutil
import re

import pytest

from nanochat.common import UserError
from nanochat.diffusion_roberta import DiffusionRoBERTa
from scripts import bench, compare

NOISE_SCALE = DiffusionRoBERTa.sampler_defaults["noise_scale"]


def test_bench_prints_json(capsys):
    bench.main(["--depth", "1", "--max_seq_len", "32", "--device_batch_size", "2", "--vocab_size", "128", "--steps", "2",
                "--warmup", "1", "--sample_steps", "1,3", "--sample_batch_size", "3", "--sample_reps", "1", "--device_type", "cpu"])
    r = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    names = ["gpt", "diffusion", "diffusion_no_self_cond", "diffusion_self_cond_every_step", "masked"]
    assert r["peak_flops"] > 0 and r["peak_flops_source"].startswith("measured")
    for key in ("flops_per_token", "train_step_s", "train_tokens_per_s", "mfu"):
        assert list(r[key]) == names and all(v > 0 for v in r[key].values()), key
    assert set(r["train_tokens_per_s_ratio"]) == set(names[1:]) and all(v > 0 for v in r["train_tokens_per_s_ratio"].values())
    # sampling: latency at batch 1 and throughput at a batch of 3, the GPT next to the diffusion models at each step count
    samplers = ["gpt"] + [f"{m} {s} steps" for m in ("diffusion", "masked") for s in (1, 3)]
    assert (r["sample_seq_len"], r["sample_batch_size"]) == (32, 3)
    for key in ("sample_latency_s", "sample_tokens_per_s"):
        assert list(r[key]) == samplers and min(r[key].values()) > 0, key
    for key in ("sample_latency_ratio", "sample_tokens_per_s_ratio"):
        assert list(r[key]) == samplers[1:] and min(r[key].values()) > 0, key
    # the self-conditioning pass costs compute: the mix lies between off and every step
    f = r["flops_per_token"]
    assert f["gpt"] < f["diffusion_no_self_cond"] < f["diffusion"] < f["diffusion_self_cond_every_step"]
    assert f["masked"] == f["gpt"] and r["num_params"]["masked"] == r["num_params"]["gpt"] + 64  # + the [MASK] row


def compare_argv(tiny_data_dir, tok_dir, out_dir, *budget):
    return [*budget, "--depth", "1", "--max_seq_len", "32", "--device_batch_size", "2", "--data_dir", str(tiny_data_dir),
            "--tokenizer_dir", str(tok_dir), "--out_dir", str(out_dir), "--eval_tokens", "128", "--final_eval_tokens", "256",
            "--models", "gpt,diffusion", "--diffusion_args", "--bound_samples 2", "--masked_args", "--bound_samples 2",
            "--num_samples", "2", "--sample_len", "24", "--sample_steps", "2,4",
            "--temperatures", "1.0,0.7", "--gpt_temperatures", "1.0", "--num_show", "2", "--device_type", "cpu"]


def test_compare_end_to_end(tiny_data_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "cmp"
    compare.main(compare_argv(tiny_data_dir, tiny_tokenizer[1], out, "--flops", "1.5e8")
                 + ["--score_temperature", "0.8", "--models", "gpt,diffusion,masked"])
    for name in ("compare.md", "compare.json", "bpb_vs_flops.png", "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "compare.json").read_text())
    plan = r["plan"]
    assert plan["budget_flops"] == 1.5e8 and plan["tokens_per_step"] == 64
    assert plan["flops_per_token"]["gpt"] < plan["flops_per_token"]["diffusion"]
    for m in ("gpt", "diffusion", "masked"):  # the same FLOPs: as many steps as fit in the budget, and the runs did them
        n = plan["num_iterations"][m]
        assert n == int(1.5e8 // (plan["flops_per_token"][m] * 64)) >= 2
        t = r["train"][m]
        assert t["num_iterations"] == n and t["flops"] <= 1.5e8 < t["flops"] + plan["flops_per_token"][m] * 64
        assert t["final"]["bpb"] > 0 and t["final"]["stderr"] > 0  # the same 256 tokens for all (the GPT predicts 31 of 32)
        assert t["final"]["tokens"] == (4 * 2 * 31 if m == "gpt" else 256)
        assert t["tokens_per_s"] > 0 and t["mfu"] > 0
        assert len(t["evals"]) >= min(n + 1, 6) and t["evals"][0]["step"] == 0 and t["evals"][-1]["step"] == n
        best = min(t["evals"], key=lambda e: e["val_bpb"])
        assert t["best_val_bpb"] == best["val_bpb"] and t["best_step"] == best["step"]
        assert r["bpb_ratio"][m] == pytest.approx(t["final"]["bpb"] / r["train"]["gpt"]["final"]["bpb"])
        assert r["best_bpb_ratio"][m] == pytest.approx(t["best_val_bpb"] / r["train"]["gpt"]["best_val_bpb"])
    for name in ("unigram", "bigram"):  # the runs' validation batches (--eval_tokens 128: 2 of 2 x 32), first tokens unscored
        assert r["ngram"][name]["bpb"] > 0 and r["ngram"][name]["tokens"] == 2 * 2 * 31
    s = r["samples"]
    assert [x["label"] for x in s["settings"]] == ["GPT T=1.0", "diffusion 2 steps T=1.0", "diffusion 2 steps T=0.7",
                                                  "diffusion 4 steps T=1.0", "diffusion 4 steps T=0.7", "masked 2 steps T=1.0",
                                                  "masked 2 steps T=0.7", "masked 4 steps T=1.0", "masked 4 steps T=0.7"]
    assert s["output_tokens"] == 2 * 23
    assert s["samplers"] == {"gpt": "autoregressive", "masked": "2/4 ancestral unmasking steps",
                             "diffusion": f"2/4 ddpm steps, noise x{NOISE_SCALE:g}, score temperature 0.8"}
    assert [x["label"] for x in s["references"]] == ["validation text", "unigram samples (training split)",
                                                    "bigram samples (training split)"]
    for x in s["settings"] + s["references"]:
        assert x["gen_ppl"] > 1 and x["unigram_entropy_nats"] > 0 and 0 <= x["repetition_rate_4gram"] <= 1
        assert 0 < x["distinct_2"] <= 1 and x["nll_ratio"] > 0 and x["entropy_ratio"] > 0 and len(x["examples"]) == 2
    assert s["settings"][0]["nll_ratio"] == 1.0 and all(x["tokens_per_s"] > 0 for x in s["settings"])
    md = (out / "compare.md").read_text()
    for text in ("![bpb](bpb_vs_flops.png)", "![frontier](frontier.png)", "val bpb at the end | / GPT's", "on 256 validation tokens",
                 "### GPT T=1.0", "### diffusion 4 steps T=1.0", "### masked 4 steps T=1.0", "### validation text",
                 "| diffusion 2 steps T=0.7 |", "| bigram samples (training split) |",
                 "Count-based references on the same validation tokens: unigram",
                 f"diffusion: 2/4 ddpm steps, noise x{NOISE_SCALE:g}, score temperature 0.8;"):
        assert text in md, text


def test_compare_reuse_keeps_a_finished_run_with_the_same_flags(tiny_data_dir, tiny_tokenizer, tmp_path, capsys):
    argv = compare_argv(tiny_data_dir, tiny_tokenizer[1], tmp_path, "--flops", "1e8")
    compare.main(argv)
    first = json.loads((tmp_path / "compare.json").read_text())["train"]
    capsys.readouterr()
    argv[argv.index("--diffusion_args") + 1] = "--bound_samples 2 --self_cond 0"  # only the diffusion half changes
    compare.main(argv + ["--reuse"])
    out = capsys.readouterr().out
    assert "gpt: reusing the finished run" in out and "diffusion: reusing" not in out
    second = json.loads((tmp_path / "compare.json").read_text())["train"]
    assert second["gpt"]["evals"] == first["gpt"]["evals"] and second["gpt"]["best_step"] == first["gpt"]["best_step"]
    assert second["diffusion"]["evals"] != first["diffusion"]["evals"]


def test_reuse_needs_the_same_flags_and_the_best_checkpoint(tiny_data_dir, tiny_tokenizer, tmp_path, capsys):
    argv = compare_argv(tiny_data_dir, tiny_tokenizer[1], tmp_path, "--flops", "1e8")
    compare.main(argv)
    args = compare.get_args(argv)
    plan, _ = compare.make_plan(args, compare.torch.device("cpu"))
    assert compare.can_reuse(args, "gpt", plan) and compare.can_reuse(args, "diffusion", plan)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "gpt", moved / "gpt")
    assert compare.can_reuse(compare.get_args(argv + ["--out_dir", str(moved)]), "gpt", plan)  # a moved --out_dir
    gpt_final = moved / "gpt" / os.path.basename(compare.final_checkpoint(args, "gpt", plan))
    ckpt = compare.torch.load(gpt_final, weights_only=True)
    del ckpt["meta"]["args"]["label_column"]  # a run older than a flag: as if at its default
    compare.torch.save(ckpt, gpt_final)
    assert compare.can_reuse(compare.get_args(argv + ["--out_dir", str(moved)]), "gpt", plan)
    ckpt["meta"]["args"]["label_column"] = "source"
    compare.torch.save(ckpt, gpt_final)
    assert not compare.can_reuse(compare.get_args(argv + ["--out_dir", str(moved)]), "gpt", plan)
    gpt_state = compare.state_path(compare.final_checkpoint(args, "gpt", plan), 0)
    intact = open(gpt_state, "rb").read()
    os.truncate(gpt_state, 1000)  # a damaged run is named and trained again, not a traceback
    assert not compare.can_reuse(args, "gpt", plan)
    assert f"gpt: {gpt_state} is not a readable state file" in capsys.readouterr().out
    open(gpt_state, "wb").write(intact)
    runs = {m: compare.train_argv(args, m, 240) for m in ("gpt", "diffusion")}
    every = {m: argv_m[argv_m.index("--eval_every") + 1] for m, argv_m in runs.items()}
    assert every == {"gpt": "10", "diffusion": "30"}  # the GPT's best point, which it reports, on a finer grid
    assert not compare.can_reuse(compare.get_args(argv + ["--gpt_args", "--matrix_lr 0.03"]), "gpt", plan)  # another GPT
    path = compare.final_checkpoint(args, "diffusion", plan)
    ckpt = compare.torch.load(path, weights_only=True)
    ckpt["meta"]["args"]["matrix_lr"] = 0.02  # trained at another rate: another computation
    compare.torch.save(ckpt, path)
    assert not compare.can_reuse(args, "diffusion", plan)
    (tmp_path / "gpt" / "gpt_best.pt").unlink()  # e.g. overwritten by an interrupted rerun: its best step is gone
    assert not compare.can_reuse(args, "gpt", plan)


def test_compare_minutes_budget(tiny_data_dir, tiny_tokenizer, tmp_path):
    """--minutes: the GPT's measured FLOP/s times the minutes is the budget, shared by both models."""
    args = compare.get_args(compare_argv(tiny_data_dir, tiny_tokenizer[1], tmp_path, "--minutes", "0.5"))
    plan, tokenizer = compare.make_plan(args, compare.torch.device("cpu"))
    assert plan["gpt_flops_per_s"] > 0 and plan["budget_flops"] == pytest.approx(plan["gpt_flops_per_s"] * 30)
    for m, f in plan["flops_per_token"].items():
        assert plan["num_iterations"][m] == max(1, int(plan["budget_flops"] // (f * 64)))


@pytest.mark.parametrize("bad, message", [
    (["--flops", "0"], "must be finite and > 0"),
    (["--flops", "inf"], "must be finite and > 0, got inf"),
    (["--minutes", "1", "--sample_steps", "0,8"], "num_steps must be an integer >= 1"),
    (["--flops", "1e9", "--temperatures", "0"], "temperature must be finite and > 0"),
    (["--flops", "1e9", "--temperatures", "nan"], "temperature must be finite and > 0, got nan"),
    (["--flops", "1e9", "--gpt_temperatures", "inf"], "temperature must be finite and > 0, got inf"),
    (["--flops", "1e9", "--noise_scale", "inf"], "noise_scale must be finite and >= 0"),
    (["--flops", "1e9", "--sample_len", "1"], "--sample_len must be >= 2"),
    (["--flops", "1e9", "--sample_batch_size", "-1"], "--sample_batch_size must be >= 1"),
    (["--flops", "1e9", "--num_show", "-1"], "--num_show must be >= 0"),
    (["--flops", "1e9", "--seed", str(2**64)], "--seed must be an integer in 0..2**63-1"),
    (["--flops", "1e9", "--out_dir", "{file}/out"], "--out_dir"),
    (["--flops", "1e9", "--diffusion_args", "--model gpt"], "--diffusion_args sets --model, which compare sets itself"),
    (["--flops", "1e9", "--gpt_args", "--check x --seed=3"], "--gpt_args sets --checkpoint_dir, --seed, which compare sets"),
    (["--flops", "1e9", "--diffusion_args", "--embed_dim '32"], "--diffusion_args \"--embed_dim '32\": No closing quotation"),
    (["--flops", "1e9", "--gpt_args", "--embed_dim 32"], "--embed_dim is a flag of the diffusion model"),
    (["--flops", "1e9", "--diffusion_args", "--depth x"], "argument --depth: invalid int value: 'x'"),
    (["--flops", "1e9", "--diffusion_args", "--matrix_lr nan"], "the diffusion run: --matrix_lr must be finite and >= 0"),
])
def test_compare_bad_flags_fail_before_training(bad, message, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match=re.escape(message)):
        compare.main([a.format(file=tmp_path / "file") for a in bad])
    assert capsys.readouterr().err == ""  # argparse's own complaint is in the message, not printed
