"""The training script: flags, batch arithmetic, DDP = gradient accumulation, checkpoints and resume, failures
(non-finite loss, Ctrl-C, missing data / tokenizer), wandb offline, and an end-to-end run that learns.
Runs in-process (nanochat.train.main, the loop behind scripts.diffusion_train) where it can, in a subprocess where
the process itself matters."""
import contextlib
import errno
import glob
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import find_latest, load_model, state_path
from nanochat.common import UserError
from nanochat.diffusion_roberta import DiffusionRoBERTa
from nanochat import train as trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device_type", "cpu", "--depth", "1", "--max_seq_len", "16", "--device_batch_size", "2",
        "--eval_every", "-1", "--sample_every", "0", "--eval_tokens", "64"]
DIFFUSION = ["--bound_samples", "2"]  # a diffusion flag: a cheap bound
LOG_LINE = re.compile(r"^step (\d{5})/(\d+) \| loss (\S+) \(smooth (\S+)\) \| lrm (\d+\.\d\d) \| dt (\d+)ms \| "
                      r"tok/s ([\d,]+) \| mfu (\d+\.\d\d)% \| eta (\d+h)?\d+m\d\ds$", re.M)


@pytest.fixture(scope="module")
def data(tiny_data_dir, tiny_tokenizer):
    return ["--data_dir", str(tiny_data_dir), "--tokenizer_dir", str(tiny_tokenizer[1])]


def train(*flags):
    """Run the training script in this process; its stdout as text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.main([*TINY, *([] if "gpt" in flags else DIFFUSION), *map(str, flags)])
    return out.getvalue()


def script_env(tmp_path, **extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NANOCHAT_BASE_DIR": str(tmp_path / "base"), **extra}


def run_script(tmp_path, *flags, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "scripts.diffusion_train", *TINY, *DIFFUSION, *map(str, flags)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=script_env(tmp_path, **env))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def final_state(ckpt_dir, step, model="diffusion", rank=0):
    model_file = Path(ckpt_dir) / f"{model}_step_{step:06d}.pt"
    return load(model_file), load(state_path(str(model_file), rank))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 3 and 6, evaluations at 0, 3, 6."""
    ckpt_dir = tmp_path_factory.mktemp("reference")
    out = train(*data, "--num_iterations", 6, "--save_every", 3, "--eval_every", 3, "--checkpoint_dir", ckpt_dir)
    return ckpt_dir, out


# --- flags ---------------------------------------------------------------------------------------------

def test_seed_command_lines_and_flags_parse():
    for argv in (["--depth=4", "--device_batch_size=1", "--num_iterations=100"],  # seed.md's CPU command
                 ["--num_iterations", "5000", "--depth", "12"], [],
                 ["--depth=12", "--num_iterations=10000", "--max_seq_len=512", "--total_batch_size=524288"]):
        trainer.check_args(trainer.get_args(argv))
    args = trainer.get_args([
        "--num_iterations", "7", "--depth", "2", "--device_batch_size", "3", "--max_seq_len", "32",
        "--total_batch_size", "192", "--data_dir", "d", "--objective", "eps", "--schedule", "sqrt", "--embed_dim", "16",
        "--self_cond", "0", "--eval_every", "5", "--eval_tokens", "99", "--sample_every", "-1", "--save_every", "4",
        "--checkpoint_dir", "c", "--resume", "--run", "r", "--device_type", "cpu", "--compile", "--seed", "3"])
    assert (args.num_iterations, args.depth, args.device_batch_size, args.max_seq_len, args.total_batch_size) == (7, 2, 3, 32, 192)
    assert (args.objective, args.schedule, args.embed_dim, args.eval_every, args.eval_tokens) == ("eps", "sqrt", 16, 5, 99)
    assert (args.sample_every, args.save_every, args.checkpoint_dir, args.resume, args.run) == (-1, 4, "c", True, "r")
    assert (args.device_type, args.compile, args.seed, args.model, args.data_dir, args.self_cond) == ("cpu", True, 3, "diffusion", "d", False)
    assert trainer.get_args([]).checkpoint_dir == "checkpoints"
    # each model has its own flags and learning rates; another model's flag is one clear error
    gpt = trainer.get_args(["--model", "gpt", "--depth", "3"])
    assert (gpt.depth, gpt.matrix_lr, gpt.head_lr, hasattr(gpt, "embed_dim")) == (3, 0.02, 0.004, False)
    with pytest.raises(SystemExit):
        trainer.get_args(["--model", "gpt", "--embed_dim", "16"])
    with pytest.raises(UserError, match="objective must be one of"):
        trainer.check_args(trainer.get_args(["--objective", "x0"]))


@pytest.mark.parametrize("flags, message", [
    (["--final_lr_frac", "nan"], "--final_lr_frac must be finite and in [0, 1], got nan"),
    (["--matrix_lr", "nan"], "--matrix_lr must be finite and >= 0"),
    (["--head_lr", "-0.1"], "--head_lr must be finite and >= 0"),
    (["--grad_clip", "inf"], "--grad_clip must be finite and >= 0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be finite and in [0, 1]"),
    (["--warmup_ratio", "0.6", "--warmdown_ratio", "0.6"], "at most 1"),
    (["--seed", str(2**63)], "--seed must be an integer in 0..2**63-1"),
    (["--seed", "-1"], "--seed must be an integer in 0..2**63-1"),
    (["--eval_every", "0"], "--eval_every must be >= 1 (-1 = only at the end)"),
    (["--save_every", "-2"], "--save_every must be >= 1"),
    (["--sample_every", "-3"], "--sample_every must be >= 1 (-1 = only at the end, 0 = never)"),
    (["--keep_last", "-1"], "--keep_last must be >= 0"),
    (["--total_batch_size", "0"], "--total_batch_size must be >= 1, or -1"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--checkpoint_dir", "{file}/ckpt"], "is a file, not a folder"),
])
def test_bad_training_flags_are_one_clear_error(flags, message, tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match=re.escape(message)):
        trainer.check_args(trainer.get_args([f.format(file=tmp_path / "file") for f in flags]))


def test_a_model_beyond_the_device_memory_is_refused_before_allocating(monkeypatch):
    args = trainer.get_args(["--max_seq_len", str(10**12), "--depth", "1"])
    config = trainer.model_config(args, 512)
    with pytest.raises(UserError, match=r"--max_seq_len 1000000000000 .* needs about .* GiB .* lower --depth or --max_seq_len"):
        trainer.check_fits(args, config, torch.device("cpu"))
    args = trainer.get_args(["--model", "gpt", "--depth", "2"])
    trainer.check_fits(args, trainer.model_config(args, 512), torch.device("cpu"))  # a small one fits
    monkeypatch.setattr(trainer, "device_memory", lambda device: 1000)
    with pytest.raises(UserError, match=r"more than the 0.0 MiB of cpu memory"):
        trainer.check_fits(args, trainer.model_config(args, 512), torch.device("cpu"))


def test_indivisible_batch_is_one_clear_error(tmp_path):
    r = run_script(tmp_path, "--total_batch_size", 100, "--data_dir", tmp_path / "nowhere")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --total_batch_size 100 must be a multiple of"), r.stderr


def test_noise_seed_is_stable():
    assert trainer.noise_seed(42, 3, 1) == trainer.noise_seed(42, 3, 1)
    assert len({trainer.noise_seed(42, s, k) for s in range(10) for k in range(4)}) == 40
    assert trainer.noise_seed(0, 0, 0) == 177716309065226  # fixed across processes and Python versions


# --- DDP -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["diffusion", "masked"])
def test_ddp_two_gloo_ranks_match_gradient_accumulation(model, data, tmp_path):
    steps = ["--model", model, "--num_iterations", 4, "--save_every", -1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "scripts.diffusion_train", *TINY, *DIFFUSION, *data, *map(str, steps), "--checkpoint_dir", str(tmp_path / "ddp")],
                       cwd=REPO, capture_output=True, text=True, timeout=240, env=script_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2" in r.stdout and "x 2 ranks x 1 accumulation steps" in r.stdout
    out = train(*data, *steps, "--total_batch_size", 2 * 2 * 16, "--checkpoint_dir", tmp_path / "accum")
    assert "x 1 ranks x 2 accumulation steps" in out
    (ddp_model, ddp_state), (acc_model, acc_state) = final_state(tmp_path / "ddp", 4, model), final_state(tmp_path / "accum", 4, model)
    ddp_losses, acc_losses = torch.tensor(ddp_state["history"]["train"]), torch.tensor(acc_state["history"]["train"])
    assert ddp_losses.shape == (4, 2)
    assert torch.allclose(ddp_losses, acc_losses, rtol=1e-5, atol=1e-6), (ddp_losses, acc_losses)
    assert_same_weights(ddp_model["model"], acc_model["model"], atol=1e-5)
    assert os.path.isfile(state_path(str(tmp_path / "ddp" / f"{model}_step_000004.pt"), 1))


# --- checkpoints and resume ----------------------------------------------------------------------------

def test_log_lines_report_and_checkpoint_format(reference, tiny_tokenizer):
    ckpt_dir, out = reference
    lines = LOG_LINE.findall(out)
    assert [int(m[0]) for m in lines] == [1, 2, 3, 4, 5, 6] and all(m[1] == "6" for m in lines)
    assert all(torch.isfinite(torch.tensor(float(m[2]))) for m in lines)
    assert len(re.findall(r"^step \d{5} \| val loss \S+ \| val bpb \S+ ± \S+$", out, re.M)) == 3
    report = (ckpt_dir / "report.md").read_text()
    assert "## Final evaluation" in report and "diffusion_curves.png" in report
    assert (ckpt_dir / "diffusion_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt, state = final_state(ckpt_dir, 6)
    assert ckpt["step"] == 6 and ckpt["model_type"] == "diffusion" and ckpt["config"]["depth"] == 1
    assert ckpt["tokenizer"]["identity"] == tiny_tokenizer[0].identity
    assert ckpt["meta"]["args"]["num_iterations"] == 6
    assert [ckpt["meta"]["args"][k] for k in ("matrix_lr", "embedding_lr", "head_lr")] == [0.01, 0.01, 0.001]  # the diffusion defaults
    assert state["optimizers"][1]["param_groups"][0]["initial_lr"] == 0.01  # ... and Muon ran at them
    assert [e["step"] for e in state["history"]["eval"]] == [0, 3, 6] and len(state["history"]["train"]) == 6
    model, tokenizer, _ = load_model(str(ckpt_dir / "diffusion_step_000006.pt"))
    assert tokenizer.identity == tiny_tokenizer[0].identity and model.config.max_seq_len == 16
    # the best model file holds the weights of the evaluation with the lowest bpb (early stopping's pick)
    evals = state["history"]["eval"]
    best = min(evals, key=lambda e: e["val_bpb"])
    best_ckpt = load(ckpt_dir / "diffusion_best.pt")
    assert best_ckpt["step"] == best["step"] and best_ckpt["meta"]["val_bpb"] == best["val_bpb"]
    if best["step"] in (3, 6):
        assert_same_weights(best_ckpt["model"], final_state(ckpt_dir, best["step"])[0]["model"], atol=0)


def test_resume_matches_uninterrupted_run_and_skips_incomplete_checkpoints(reference, data, tmp_path):
    ref_dir, _ = reference
    for f in glob.glob(str(ref_dir / "diffusion_step_000003*")):
        shutil.copy(f, tmp_path)
    shutil.copy(ref_dir / "diffusion_step_000006.pt", tmp_path)  # a model file without its state file: incomplete
    (tmp_path / "diffusion_step_000009.pt.tmp").write_bytes(b"killed mid-save")
    (tmp_path / "diffusion_step_000009.state_rank0.pt").write_bytes(b"killed before the model file")
    assert find_latest(str(tmp_path), "diffusion", 1) == str(tmp_path / "diffusion_step_000003.pt")
    out = train(*data, "--num_iterations", 6, "--save_every", 3, "--eval_every", 3, "--checkpoint_dir", tmp_path, "--resume")
    assert "resumed from" in out and "diffusion_step_000003.pt at step 3" in out
    assert [int(m[0]) for m in LOG_LINE.findall(out)] == [4, 5, 6]
    (ref_model, ref_state), (res_model, res_state) = final_state(ref_dir, 6), final_state(tmp_path, 6)
    assert torch.allclose(torch.tensor(res_state["history"]["train"]), torch.tensor(ref_state["history"]["train"]), rtol=1e-6, atol=0)
    assert [e["step"] for e in res_state["history"]["eval"]] == [0, 3, 6]  # no second evaluation at step 3
    assert_same_weights(ref_model["model"], res_model["model"], atol=1e-6)
    assert res_state["loaders"] == ref_state["loaders"]


def test_masked_model_resumes_exactly(data, tmp_path):
    steps = ["--model", "masked", "--num_iterations", 4, "--save_every", 2, "--eval_every", 2]
    train(*data, *steps, "--checkpoint_dir", tmp_path / "ref")
    (tmp_path / "res").mkdir()
    for f in glob.glob(str(tmp_path / "ref" / "masked_step_000002*")):
        shutil.copy(f, tmp_path / "res")
    out = train(*data, *steps, "--checkpoint_dir", tmp_path / "res", "--resume")
    assert "masked_step_000002.pt at step 2" in out and [int(m[0]) for m in LOG_LINE.findall(out)] == [3, 4]
    (ref_model, ref_state), (res_model, res_state) = (final_state(tmp_path / d, 4, "masked") for d in ("ref", "res"))
    assert res_model["model_type"] == "masked" and res_state["history"]["train"] == ref_state["history"]["train"]
    untimed = lambda state: [{k: v for k, v in e.items() if k != "time"} for e in state["history"]["eval"]]
    assert untimed(res_state) == untimed(ref_state)
    assert_same_weights(ref_model["model"], res_model["model"], atol=0)
    assert res_state["loaders"] == ref_state["loaders"]


def test_resume_with_another_learning_rate_uses_it(reference, data, tmp_path):
    ref_dir, _ = reference
    for f in glob.glob(str(ref_dir / "diffusion_step_000006*")):
        shutil.copy(f, tmp_path)
    out = train(*data, "--num_iterations", 7, "--matrix_lr", 0.03, "--checkpoint_dir", tmp_path, "--resume")
    assert "--matrix_lr 0.01 -> 0.03" in out  # the flags decide, not the rates stored with the optimiser state
    assert final_state(tmp_path, 7)[1]["optimizers"][1]["param_groups"][0]["initial_lr"] == 0.03


def test_resume_with_another_config_or_nothing_is_a_clear_error(reference, data, tmp_path):
    ref_dir, _ = reference
    for f in glob.glob(str(ref_dir / "diffusion_step_*")):
        shutil.copy(f, tmp_path)
    with pytest.raises(UserError, match=r"another configuration .*'depth': \(1, 2\)"):
        train(*data, "--depth", 2, "--num_iterations", 6, "--checkpoint_dir", tmp_path, "--resume")
    with pytest.raises(UserError, match="written by 1 ranks x 1 accumulation steps"):
        train(*data, "--total_batch_size", 64, "--num_iterations", 6, "--checkpoint_dir", tmp_path, "--resume")
    with pytest.raises(UserError, match="no complete diffusion checkpoint"):
        train(*data, "--num_iterations", 6, "--checkpoint_dir", tmp_path / "empty", "--resume")
    state_file = state_path(str(tmp_path / "diffusion_step_000006.pt"), 0)
    state = torch.load(state_file, weights_only=True)
    state["optimizers"][0]["param_groups"].pop()  # parameter groups of another model
    torch.save(state, state_file)
    with pytest.raises(UserError, match="does not fit this version's parameter groups"):
        train(*data, "--num_iterations", 6, "--checkpoint_dir", tmp_path, "--resume")


def run_id(path):
    return load(path)["meta"]["run_id"]


def test_a_fresh_run_refuses_a_used_folder_unless_resumed_or_overwritten(data, tmp_path):
    steps = ["--save_every", 1, "--checkpoint_dir", tmp_path]
    train(*data, "--num_iterations", 2, "--seed", 1, *steps)
    first = run_id(tmp_path / "diffusion_step_000002.pt")
    assert load(state_path(str(tmp_path / "diffusion_step_000002.pt"), 0))["run_id"] == first
    assert run_id(tmp_path / "diffusion_best.pt") == first
    with pytest.raises(UserError, match="holds another diffusion run .*diffusion_best.pt.*--resume.*--overwrite"):
        train(*data, "--num_iterations", 2, "--seed", 2, *steps)
    train(*data, "--model", "gpt", "--num_iterations", 1, *steps)  # the other model shares the folder
    out = train(*data, "--num_iterations", 3, "--seed", 1, *steps, "--resume")
    assert "resumed from" in out and "diffusion_step_000002.pt at step 2" in out
    assert run_id(tmp_path / "diffusion_step_000003.pt") == first  # a resumed run keeps its identity
    train(*data, "--num_iterations", 1, "--seed", 2, *steps, "--overwrite")
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("diffusion_") and n.endswith(".pt")] == [
        "diffusion_best.pt", "diffusion_step_000001.pt", "diffusion_step_000001.state_rank0.pt"]
    assert run_id(tmp_path / "diffusion_step_000001.pt") != first
    assert "gpt_step_000001.pt" in names  # --overwrite deletes only this model's checkpoints


def test_keep_last_rotates_step_checkpoints(data, tmp_path):
    train(*data, "--num_iterations", 5, "--save_every", 1, "--eval_every", 2, "--keep_last", 2, "--checkpoint_dir", tmp_path)
    pt = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
    assert pt == ["diffusion_best.pt", "diffusion_step_000004.pt", "diffusion_step_000004.state_rank0.pt",
                  "diffusion_step_000005.pt", "diffusion_step_000005.state_rank0.pt"]
    assert load(tmp_path / "diffusion_best.pt")["step"] in (0, 2, 4, 5)  # kept whatever its step
    train(*data, "--num_iterations", 3, "--save_every", 1, "--keep_last", 0, "--checkpoint_dir", tmp_path / "all")
    assert len(glob.glob(str(tmp_path / "all" / "diffusion_step_*.state_rank0.pt"))) == 3


@pytest.mark.parametrize("damage", ["truncated state file", "truncated model file", "state file of another run"])
def test_resume_falls_back_over_a_damaged_newest_checkpoint(damage, reference, data, tmp_path):
    ref_dir, _ = reference
    for f in glob.glob(str(ref_dir / "diffusion_step_*")):
        shutil.copy(f, tmp_path)
    newest = tmp_path / "diffusion_step_000006.pt"
    damaged = Path(state_path(str(newest), 0)) if "state" in damage else newest
    if damage.startswith("truncated"):
        os.truncate(damaged, 1000)
    else:
        state = load(damaged)
        torch.save({**state, "run_id": "another run"}, damaged)
    out = train(*data, "--num_iterations", 6, "--save_every", 3, "--eval_every", 3, "--checkpoint_dir", tmp_path, "--resume")
    assert f"note: {damaged}" in out and "falling back to the newest intact checkpoint" in out
    assert "diffusion_step_000003.pt at step 3" in out and [int(m[0]) for m in LOG_LINE.findall(out)] == [4, 5, 6]
    assert_same_weights(final_state(ref_dir, 6)[0]["model"], final_state(tmp_path, 6)[0]["model"], atol=1e-6)
    assert run_id(newest) == run_id(ref_dir / "diffusion_step_000006.pt")


def test_resume_from_another_models_checkpoint_says_what_it_is(data, tmp_path):
    train(*data, "--model", "gpt", "--num_iterations", 1, "--checkpoint_dir", tmp_path / "gpt")
    (tmp_path / "copy").mkdir()
    for suffix in (".pt", ".state_rank0.pt"):
        shutil.copy(tmp_path / "gpt" / f"gpt_step_000001{suffix}", tmp_path / "copy" / f"diffusion_step_000001{suffix}")
    with pytest.raises(UserError, match=r"diffusion_step_000001.pt is a gpt checkpoint; this run trains a diffusion model"):
        train(*data, "--num_iterations", 2, "--checkpoint_dir", tmp_path / "copy", "--resume")


# --- failures ------------------------------------------------------------------------------------------

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_checkpoint(what, data, tmp_path, monkeypatch):
    forward, calls = DiffusionRoBERTa.forward, []

    def poisoned(self, tokens):
        loss = forward(self, tokens)
        if self.training:
            calls.append(1)
            if len(calls) == 4:  # the 4th training step (step index 3)
                return loss * float("nan") if what == "loss" else NanGrad.apply(loss)
        return loss

    monkeypatch.setattr(DiffusionRoBERTa, "forward", poisoned)
    expect = "the training loss is nan at step 3" if what == "loss" else "the gradient norm is nan at step 3"
    with pytest.raises(UserError, match=f"{expect}; stopping before the update .*diffusion_step_000002.pt"):
        train(*data, "--num_iterations", 6, "--save_every", 2, "--checkpoint_dir", tmp_path)
    assert find_latest(str(tmp_path), "diffusion", 1) == str(tmp_path / "diffusion_step_000002.pt")
    assert sorted(os.listdir(tmp_path)) == ["diffusion_step_000002.pt", "diffusion_step_000002.state_rank0.pt"]
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "diffusion_step_000002.pt")["model"].values())


@pytest.mark.parametrize("poison", ["weights", "evaluation"])
def test_non_finite_weights_or_evaluation_stop_without_a_nan_checkpoint(poison, data, tmp_path, monkeypatch):
    muon_step, evaluate_bpb, calls = torch.optim.Muon.step, trainer.evaluate_bpb, []

    def poisoned_update(self):  # the 3rd update (step index 2) leaves a NaN in the weights
        muon_step(self)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))

    def poisoned_evaluation(model, batches, token_bytes):  # the 2nd evaluation (at step 2)
        calls.append(1)
        return dict(evaluate_bpb(model, batches, token_bytes), bpb=float("nan")) if len(calls) == 2 else evaluate_bpb(model, batches, token_bytes)

    if poison == "weights":
        monkeypatch.setattr(torch.optim.Muon, "step", poisoned_update)
        expect = "the weights are not finite at step 3; stopping without saving them"
    else:
        monkeypatch.setattr(trainer, "evaluate_bpb", poisoned_evaluation)
        expect = "the validation bpb is nan at step 2; stopping"
    last_good = 2 if poison == "weights" else 1
    with pytest.raises(UserError, match=f"{expect} .*diffusion_step_{last_good:06d}.pt"):
        train(*data, "--num_iterations", 6, "--save_every", 1, "--eval_every", 2, "--checkpoint_dir", tmp_path)
    assert find_latest(str(tmp_path), "diffusion", 1) == str(tmp_path / f"diffusion_step_{last_good:06d}.pt")
    assert not glob.glob(str(tmp_path / f"diffusion_step_{last_good + 1:06d}*"))
    for f in glob.glob(str(tmp_path / "diffusion_*.pt")):
        if "state" not in f:
            assert all(torch.isfinite(v).all() for v in load(f)["model"].values()), f


FULL_DISK = {"state file": OSError(errno.ENOSPC, "No space left on device"),
             "model file": RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1472 vs 1360")}


@pytest.mark.parametrize("failing_write", FULL_DISK)
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_space(failing_write, data, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f):  # the second checkpoint's state file (3rd write) or its model file (4th), as torch.save fails
        calls.append(1)
        if len(calls) == (3 if failing_write == "state file" else 4):
            Path(f).write_bytes(b"x" * 100)  # part of it was written
            raise FULL_DISK[failing_write]
        save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not write .*diffusion_step_000002.* \((No space left on device|.*unexpected pos.*)\); it needs "
                                        r"about \S+ MiB and .* is free in .*the last good checkpoint is .*diffusion_step_000001.pt"):
        train(*data, "--num_iterations", 4, "--save_every", 1, "--checkpoint_dir", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["diffusion_step_000001.pt", "diffusion_step_000001.state_rank0.pt"]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    cmd = [sys.executable, "-m", "scripts.diffusion_train", *TINY, *DIFFUSION, *data, "--num_iterations", "100000",
           "--save_every", "-1", "--checkpoint_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(tmp_path))
    try:
        for line in proc.stdout:
            if line.startswith("step 00003/"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err
    step = int(re.search(r"interrupted at step (\d+): saving a checkpoint", out).group(1))
    assert step >= 3 and f"step {step:05d}/100000" in out and f"step {step + 1:05d}/" not in out
    assert find_latest(str(tmp_path), "diffusion", 1) == str(tmp_path / f"diffusion_step_{step:06d}.pt")
    ckpt, state = final_state(tmp_path, step)
    assert ckpt["step"] == step and len(state["history"]["train"]) == step


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes(data, tmp_path):
    cmd = [sys.executable, "-m", "scripts.diffusion_train", *TINY, *DIFFUSION, *data, "--num_iterations", "100000",
           "--save_every", "-1", "--checkpoint_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(tmp_path))
    try:
        for line in proc.stdout:
            if line.startswith("step 00003/"):
                break
        proc.send_signal(signal.SIGTERM)  # as a cluster scheduler preempts a job
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err
    step = int(re.search(r"terminated \(SIGTERM\) at step (\d+): saving a checkpoint", out).group(1))
    assert find_latest(str(tmp_path), "diffusion", 1) == str(tmp_path / f"diffusion_step_{step:06d}.pt")
    out = train(*data, "--num_iterations", step + 2, "--checkpoint_dir", tmp_path, "--resume")
    assert f"at step {step}" in out and [int(m[0]) for m in LOG_LINE.findall(out)] == [step + 1, step + 2]


def test_missing_or_empty_data_dir_names_the_command(tiny_tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    for data_dir in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError, match=re.escape("python -m nanochat.dataset -n 8")):
            train("--data_dir", data_dir, "--tokenizer_dir", tiny_tokenizer[1], "--num_iterations", 1, "--checkpoint_dir", tmp_path)


def test_missing_tokenizer_is_trained_on_the_data(tiny_data_dir, tmp_path):
    tok_dir = tmp_path / "tok"
    out = train("--data_dir", tiny_data_dir, "--tokenizer_dir", tok_dir, "--vocab_size", 300, "--num_iterations", 1,
                "--checkpoint_dir", tmp_path / "ckpt")
    assert f"no tokenizer in {tok_dir}: training one with vocab_size 300" in out
    assert (tok_dir / "tokenizer.json").is_file()
    assert load(tmp_path / "ckpt" / "diffusion_step_000001.pt")["config"]["vocab_size"] == 300


# --- wandb, the GPT baseline, end to end ---------------------------------------------------------------

def test_wandb_offline_run_records_metrics(data, tmp_path):
    r = run_script(tmp_path, *data, "--num_iterations", 2, "--checkpoint_dir", tmp_path / "ckpt", "--run", "testrun",
                   WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    logged = b"".join(Path(f).read_bytes() for f in glob.glob(os.path.join(runs[0], "*.wandb")))
    for key in (b"train/loss", b"train/lrm", b"train/mfu", b"val/bpb", b"testrun"):
        assert key in logged, key


def test_gpt_baseline_trains_with_the_same_loop(data, tmp_path):
    out = train(*data, "--model", "gpt", "--num_iterations", 3, "--checkpoint_dir", tmp_path)
    assert out.startswith("gpt: ") and len(LOG_LINE.findall(out)) == 3
    ckpt = load(tmp_path / "gpt_step_000003.pt")
    assert ckpt["model_type"] == "gpt" and ckpt["step"] == 3
    assert (tmp_path / "report_gpt.md").is_file() and (tmp_path / "gpt_curves.png").is_file()
    assert find_latest(str(tmp_path), "diffusion", 1) is None
    assert (ckpt["meta"]["args"]["matrix_lr"], ckpt["meta"]["args"]["head_lr"]) == (0.02, 0.004)  # the GPT's own defaults


@pytest.mark.parametrize("model", ["diffusion", "masked"])
def test_end_to_end_validation_bpb_falls(model, data, tmp_path):
    t0 = time.time()
    train(*data, "--model", model, "--depth", 2, "--max_seq_len", 64, "--device_batch_size", 8, "--num_iterations", 150,
          "--eval_every", 75, "--eval_tokens", 2048, "--bound_samples", 4, "--save_every", -1, "--checkpoint_dir", tmp_path)
    evals = final_state(tmp_path, 150, model)[1]["history"]["eval"]
    bpb = [e["val_bpb"] for e in evals]
    assert [e["step"] for e in evals] == [0, 75, 150]
    # the same validation batches and noise at every evaluation: a paired comparison
    assert bpb[-1] < bpb[0] - 0.25 and bpb[-1] < 0.95 * bpb[0], bpb
    print(f"{model}: val bpb {bpb} in {time.time() - t0:.1f}s")
