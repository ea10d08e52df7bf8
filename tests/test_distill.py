"""Progressive distillation (nanochat/distill.py, scripts.diffusion_distill): the student learns to take in one step
what its teacher takes in two, its checkpoints are ordinary diffusion checkpoints that sample at their step count by
default, an interrupted distillation resumes exactly, and bad input is one clear error."""
import glob
import json
import shutil
from dataclasses import replace

import pytest
import torch

from nanochat import train as trainer
from nanochat.checkpoint import load_model
from nanochat.dataloader import DataLoader
from nanochat.common import UserError, run_main
from nanochat.distill import Student
from nanochat.optim import setup_optimizers
from nanochat.tokenizer import Tokenizer
from scripts import diffusion_demo, diffusion_distill, diffusion_sample, step_table
from tests.test_train import assert_same_weights, final_state

TINY = ["--device_type", "cpu", "--device_batch_size", "4", "--eval_tokens", "128", "--sample_every", "0"]


@pytest.fixture(scope="module")
def data(tiny_data_dir, tiny_tokenizer):
    return ["--data_dir", str(tiny_data_dir), "--tokenizer_dir", str(tiny_tokenizer[1])]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A depth-1 diffusion checkpoint trained by the training script (the teacher of every test here), over a wide
    log-SNR range, where 2 steps are far enough from 4 to leave its students something to learn."""
    out = tmp_path_factory.mktemp("teacher")
    trainer.main([*TINY, *data, "--depth", "1", "--max_seq_len", "32", "--num_iterations", "40", "--eval_every", "-1", "--bound_samples", "2",
                  "--gamma_min", "-3", "--checkpoint_dir", str(out)])
    return out / "diffusion_step_000040.pt"


@pytest.fixture(scope="module")
def judge(data, tmp_path_factory):
    """A depth-1 GPT checkpoint with the teacher's tokenizer."""
    out = tmp_path_factory.mktemp("gpt")
    trainer.main([*TINY, *data, "--model", "gpt", "--depth", "1", "--max_seq_len", "32", "--num_iterations", "20",
                  "--eval_every", "-1", "--checkpoint_dir", str(out)])
    return out / "gpt_step_000020.pt"


def distill(teacher, out_dir, *flags):
    diffusion_distill.main(["--teacher", str(teacher), "--out_dir", str(out_dir), *TINY, "--eval_every", "3",
                            "--save_every", "3", "--keep_last", "0", "--bound_samples", "2", *map(str, flags)])


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """4 -> 2 -> 1 steps, 6 training steps per round (checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("distilled")
    distill(teacher, out, "--steps_from", 4, "--steps_to", 1, "--num_iterations", 6)
    return out


def ddim_samples(model, n=64, **options):
    return model.generate(n, 32, {0: 0}, generator=torch.Generator().manual_seed(0), sampler="ddim",
                          score_temperature=1.0, **options)


def test_the_student_learns_to_take_two_teacher_steps_in_one(teacher, tiny_data_dir):
    """After training, the student's 2 deterministic steps reproduce the teacher's 4 (from the same noise) better
    than the untrained student's (the teacher itself at 2 steps do), and its distillation loss on validation rows
    falls."""
    model, tokenizer, _ = load_model(str(teacher))
    torch.manual_seed(0)
    student = Student.from_teacher(model, replace(model.config, distilled_steps=2))
    target = ddim_samples(model, num_steps=4)
    val = next(DataLoader(tokenizer, 16, 32, "val", tiny_data_dir))

    def fidelity():
        """(share of the teacher's 4-step tokens that the student's 2 steps reproduce, loss on val)"""
        student.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            loss = student(val).item()
        student.train()
        return (ddim_samples(student, num_steps=2) == target)[:, 1:].float().mean().item(), loss

    before = fidelity()
    optimizers = setup_optimizers(student)
    for step, tokens in zip(range(150), DataLoader(tokenizer, 8, 32, "train", tiny_data_dir)):
        torch.manual_seed(step)
        student(tokens).backward()
        for opt in optimizers:
            opt.step()
        student.zero_grad(set_to_none=True)
    after = fidelity()
    assert after[0] > before[0] + 0.01 and after[1] < 0.98 * before[1], (before, after)  # measured: 0.853 -> 0.882, 2.29 -> 2.15


def test_rounds_write_ordinary_checkpoints_that_sample_at_their_step_count(distilled, teacher, tmp_path, capsys):
    """Each round's student is a plain diffusion checkpoint (model type, config, the teacher's tokenizer) recording its
    step count; loaded as any checkpoint, it samples with N DDIM steps by default, and diffusion_sample keeps a prompt."""
    _, tokenizer, teacher_ckpt = load_model(str(teacher))
    for steps in (2, 1):
        path = distilled / f"steps_{steps:03d}" / "diffusion_step_000006.pt"
        model, tok, ckpt = load_model(str(path))
        assert type(model).__name__ == "DiffusionRoBERTa" and ckpt["model_type"] == "diffusion"
        assert ckpt["config"] == {**teacher_ckpt["config"], "distilled_steps": steps, "bound_samples": 2}
        assert tok.identity == tokenizer.identity and ckpt["step"] == 6
        assert model.sampler_settings(**model.sampler_defaults) == {**model.sampler_defaults, "num_steps": steps,
                                                                    "sampler": "ddim", "score_temperature": 1.0}
        assert torch.equal(model.generate(2, 32, {0: 0}, generator=torch.Generator().manual_seed(0)),
                           ddim_samples(model, n=2, num_steps=steps))  # its default: N DDIM steps at score temperature 1
        args = ckpt["meta"]["args"]
        assert (args["distilled_steps"], args["checkpoint_dir"]) == (steps, str(path.parent))
    out = tmp_path / "s.jsonl"
    diffusion_sample.main(["--checkpoint", str(path), "--num_samples", "2", "--seq_len", "24", "--prompt", "To be",
                           "--output", str(out)])
    assert "1 ddim steps" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["text"].startswith("To be") and (r["num_steps"], r["sampler"]) == (1, "ddim") for r in records)
    diffusion_demo.main(["--checkpoint", str(path), "--out_dir", str(tmp_path / "demo")])
    assert "to text in 1 denoising steps" in capsys.readouterr().out


def test_an_interrupted_distillation_resumes_exactly(distilled, teacher, tmp_path, capsys):
    """Round 2 -> 1 stopped after its checkpoint at step 3: --resume keeps round 1, continues round 2 from step 3, and
    ends with the uninterrupted run's weights, losses and data position."""
    shutil.copytree(distilled / "steps_002", tmp_path / "steps_002")
    (tmp_path / "steps_001").mkdir()
    for f in glob.glob(str(distilled / "steps_001" / "diffusion_step_000003*")):
        shutil.copy(f, tmp_path / "steps_001")
    capsys.readouterr()
    with pytest.raises(UserError, match="holds a distillation.*--resume"):
        distill(teacher, tmp_path, "--steps_from", 4, "--steps_to", 1, "--num_iterations", 6)
    distill(teacher, tmp_path, "--steps_from", 4, "--steps_to", 1, "--num_iterations", 6, "--resume")
    out = capsys.readouterr().out
    assert "round 4 -> 2 steps: done" in out and "at step 3" in out
    (ref_model, ref_state), (res_model, res_state) = (final_state(d / "steps_001", 6) for d in (distilled, tmp_path))
    assert res_state["history"]["train"] == ref_state["history"]["train"] and res_state["loaders"] == ref_state["loaders"]
    assert_same_weights(ref_model["model"], res_model["model"], atol=0)


@pytest.mark.parametrize("flags, message", [
    (["--steps_from", "12", "--steps_to", "4"], "must be --steps_to 4 times a power of two"),
    (["--steps_from", "4", "--steps_to", "4"], "times a power of two (>= 2)"),
    (["--depth", "2"], "--depth: the distillation sets these itself"),
    (["--checkpoint_dir", "x"], "--checkpoint_dir: the distillation sets these itself"),
    (["--teacher", "{gpt}"], "is a gpt checkpoint; distillation needs a diffusion one"),
    (["--teacher", "{student}", "--steps_from", "8"], "was distilled for 2 steps: distil it further with --steps_from 2"),
    (["--tokenizer_dir", "{other_tokenizer}"], "is not the teacher's"),
    (["--matrix_lr", "-1"], "--matrix_lr must be finite and >= 0"),
])
def test_bad_distillation_flags_are_one_clear_error(flags, message, teacher, distilled, judge, tmp_path_factory, tmp_path, capsys):
    other = tmp_path_factory.getbasetemp() / "other_tokenizer"
    if not other.exists():
        Tokenizer.train_from_iterator(iter(["a b c d e f g"] * 20), 300).save(other)
    paths = dict(gpt=judge, student=distilled / "steps_002" / "diffusion_step_000006.pt", other_tokenizer=other)
    argv = ["--teacher", str(teacher), "--out_dir", str(tmp_path / "out"), "--num_iterations", "2", *TINY]
    argv += [f.format(**paths) for f in flags]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: diffusion_distill.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_step_table_judges_teacher_and_students_against_the_gpt(teacher, distilled, judge, tiny_data_dir, tmp_path, capsys):
    """The teacher at every step count with both samplers, each student at its own step count, every row next to
    the GPT's own samples (ratio 1 for the GPT itself), and each diffusion checkpoint's bound."""
    students = [distilled / f"steps_{n:03d}" / "diffusion_step_000006.pt" for n in (2, 1)]
    out = tmp_path / "table.json"
    step_table.main(["--judge", str(judge), "--checkpoints", str(teacher), *map(str, students), "--steps", "1,3",
                     "--num_samples", "4", "--sample_len", "16", "--eval_tokens", "64", "--data_dir", str(tiny_data_dir),
                     "--device_type", "cpu", "--output", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    rows = [(row["label"].split("/")[-1], row["sampler"]) for row in r["rows"]]
    assert rows == [("GPT T=1.0 (reference)", "autoregressive"),
                    *[("diffusion_step_000040.pt", how) for n in (1, 3) for how in (
                        f"{n} ddpm steps, noise x0.85, score temperature 0.9", f"{n} ddim steps")],
                    ("diffusion_step_000006.pt (distilled)", "2 ddim steps"), ("diffusion_step_000006.pt (distilled)", "1 ddim steps")]
    assert r["rows"][0]["nll_ratio"] == r["rows"][0]["entropy_ratio"] == 1.0
    assert all(row["gen_nll"] > 0 and row["unigram_entropy_nats"] > 0 for row in r["rows"])
    assert set(r["val_bpb"]) == {str(teacher), *map(str, students)} and all(b["bpb"] > 0 for b in r["val_bpb"].values())
    assert printed.count("| steps_001/diffusion_step_000006.pt (distilled) | 1 ddim steps |") == 1
    step_table.main(["--judge", str(judge), "--checkpoints", str(students[1]), "--num_samples", "4", "--sample_len", "16",
                     "--temperature", "0.5", "--device_type", "cpu", "--output", str(out)])
    cooler = json.loads(out.read_text())["rows"]
    assert cooler[0]["gen_nll"] == r["rows"][0]["gen_nll"]  # the reference stays the GPT's samples at temperature 1
