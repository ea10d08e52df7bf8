"""
Distil a trained diffusion checkpoint into students that sample in fewer deterministic (DDIM) steps: progressive
distillation (Salimans & Ho 2022). Each round trains a student, initialised as its teacher, to take in one step what
the teacher takes in two; the rounds halve the step count from --steps_from down to --steps_to, each round's student
the next round's teacher. The loss and the choices behind it: nanochat/distill.py.

    python -m scripts.diffusion_distill --teacher checkpoints/diffusion_best.pt --steps_from 128 --steps_to 4 --num_iterations 300
    torchrun --nproc_per_node=8 -m scripts.diffusion_distill --teacher FILE --num_iterations 2000 --device_batch_size 32

Round N (N = steps_from / 2, ..., steps_to) trains in --out_dir/steps_N, --num_iterations steps, by the training loop
of scripts.diffusion_train: its other flags work here (batch, learning rates, evaluation, checkpoints, wandb, device;
the evaluation's bits per byte are the student's bound), the model's come from the teacher (--bound_samples aside).
Every checkpoint a round writes is an ordinary diffusion checkpoint whose default sampler is its N DDIM steps:
diffusion_sample, diffusion_eval and the demo load it as any other. The data and tokenizer default to the teacher's
training flags. --resume continues an interrupted distillation: finished rounds are kept, the interrupted one
resumes exactly where it stopped.
"""

import argparse
import os
from dataclasses import fields

from nanochat import train as trainer
from nanochat.checkpoint import checkpoint_path, find_latest, load_model, read_checkpoint, run_files
from nanochat.common import UserError, get_dist_info, print0, run_main
from nanochat.diffusion_roberta import DiffusionConfig
from nanochat.distill import Student
from nanochat.optim import learning_rates
from nanochat.tokenizer import get_tokenizer

# diffusion_train flags that the distillation sets itself: the model (the teacher's network), where each round
# writes, and whether it resumes
DISTILL_SETS = {f.name for f in fields(DiffusionConfig)} - {"bound_samples"} | {"model", "checkpoint_dir", "resume", "overwrite"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", required=True, help="the diffusion checkpoint to distil (or a student, to distil it further)")
    a("--steps_from", type=int, default=None, help="the teacher's steps in the first round (default: 128, or the "
      "steps a distilled teacher was distilled for)")
    a("--steps_to", type=int, default=4, help="the last round's student steps (steps_from / 2^k)")
    a("--out_dir", default="distill", help="one folder per round in it: steps_064, steps_032, ...")
    a("--resume", action="store_true", help="continue the distillation in --out_dir")
    return p.parse_known_args(argv)  # the rest: diffusion_train flags


def round_dir(out_dir, steps):
    return os.path.join(out_dir, f"steps_{steps:03d}")


def plan_rounds(steps_from, steps_to):
    """The students' step counts, round by round: steps_from / 2, ..., steps_to."""
    if not (steps_to >= 1 and steps_from > steps_to and steps_from % steps_to == 0
            and (steps_from // steps_to) & (steps_from // steps_to - 1) == 0):
        raise UserError(f"--steps_from {steps_from} must be --steps_to {steps_to} times a power of two (>= 2), "
                        f"e.g. --steps_from 128 --steps_to 4")
    rounds, n = [], steps_from
    while n > steps_to:
        n //= 2
        rounds.append(n)
    return rounds


def teacher_argv(ckpt, train_flags):
    """diffusion_train flags for every round: the teacher's network (its config), its data and tokenizer and the
    student's learning rates unless given, then the flags passed on."""
    refused = sorted(trainer.flags_set("diffusion", train_flags) & DISTILL_SETS)
    if refused:
        raise UserError(f"{', '.join('--' + f for f in refused)}: the distillation sets these itself (the student is "
                        f"the teacher's network; use --out_dir and --resume)")
    config = {k: v for k, v in ckpt["config"].items() if k not in ("vocab_size", "distilled_steps")}
    argv = [x for k, v in config.items() for x in (f"--{k}", str(int(v) if isinstance(v, bool) else v))]
    given = trainer.flags_set("diffusion", train_flags)
    for flag in ("data_dir", "tokenizer_dir"):  # where the teacher was trained, unless given
        value = ckpt["meta"].get("args", {}).get(flag)
        if flag not in given and value is not None:
            argv += [f"--{flag}", value]
    argv += [x for name, rate in learning_rates(Student).items() if name not in given for x in (f"--{name}", str(rate))]
    return argv + list(train_flags)


def check_tokenizer(ckpt, args):
    """One UserError unless the tokenizer that the rounds load is the teacher's."""
    try:
        identity = get_tokenizer(args.tokenizer_dir).identity
    except UserError as e:
        raise UserError(f"{e}; pass --tokenizer_dir with the teacher's tokenizer") from None
    if identity != ckpt["tokenizer"]["identity"]:
        raise UserError(f"the tokenizer in --tokenizer_dir {args.tokenizer_dir} is not the teacher's: pass the one it was trained with")


def round_done(path, world_size):
    return find_latest(os.path.dirname(path), "diffusion", world_size) == path


def main(argv=None):
    args, train_flags = get_args(argv)
    ckpt = read_checkpoint(args.teacher)
    if ckpt["model_type"] != "diffusion":
        raise UserError(f"--teacher {args.teacher} is a {ckpt['model_type']} checkpoint; distillation needs a diffusion one")
    distilled = ckpt["config"].get("distilled_steps", 0)
    steps_from = args.steps_from or distilled or 128
    if distilled and steps_from != distilled:
        raise UserError(f"--teacher {args.teacher} was distilled for {distilled} steps: distil it further with "
                        f"--steps_from {distilled}")
    rounds = plan_rounds(steps_from, args.steps_to)
    base_argv = teacher_argv(ckpt, train_flags)
    targs = trainer.get_args(base_argv + ["--distilled_steps", str(rounds[0]), "--checkpoint_dir", args.out_dir])
    trainer.check_args(targs)  # every flag, and that --out_dir can be written, before any round trains
    check_tokenizer(ckpt, targs)
    used = [n for n in rounds if run_files(round_dir(args.out_dir, n), "diffusion")]
    if used and not args.resume:
        raise UserError(f"--out_dir {args.out_dir} holds a distillation (rounds {', '.join(map(str, used))}): continue "
                        f"it with --resume, or choose another --out_dir")
    world_size = get_dist_info()[3]
    teacher = args.teacher
    for steps in rounds:
        folder = round_dir(args.out_dir, steps)
        final = checkpoint_path(folder, "diffusion", targs.num_iterations)
        if round_done(final, world_size):
            print0(f"round {2 * steps} -> {steps} steps: done ({final})")
        else:
            print0(f"round {2 * steps} -> {steps} steps: teacher {teacher}, student in {folder}")
            resume = ["--resume"] if find_latest(folder, "diffusion", world_size) else ["--overwrite"]
            build = lambda config, device, path=teacher: Student.from_teacher(load_model(path, device)[0], config)
            trainer.main(base_argv + ["--distilled_steps", str(steps), "--checkpoint_dir", folder] + resume, build=build)
        teacher = final
    print0("students: " + ", ".join(f"{n} steps {checkpoint_path(round_dir(args.out_dir, n), 'diffusion', targs.num_iterations)}"
                                    for n in rounds))


if __name__ == "__main__":
    run_main(main)
