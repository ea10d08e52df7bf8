"""
Compare the models of this project (an autoregressive GPT, the continuous diffusion model, the masked diffusion
model) at the same shape, trained on the same data for the same compute.

    python -m scripts.compare --minutes 10 --depth 8 --max_seq_len 512 --device_batch_size 32
    python -m scripts.compare --flops 2e17 --models gpt,diffusion --diffusion_args "--embed_dim 32 --self_cond 0"

Every model of --models (the GPT among them: it is the judge) is trained by scripts.diffusion_train (in this
process, the GPT first) with the same shape, batch, data and seed, each for budget / (its training FLOPs per token x
tokens per step) steps. With --minutes the budget is what the GPT computes in that many minutes of training on this
device (its FLOP/s measured over a few real training steps first): every model then gets the same FLOPs, not the
same time. --gpt_args, --diffusion_args and --masked_args are extra diffusion_train flags for one model only.

At the end of training each model is evaluated on --final_eval_tokens validation tokens (the GPT exactly, the
diffusion models by their likelihood bounds), the figures the comparison reports; the cheaper evaluations along the
runs draw the curves, and the best of them is a secondary column. Then the GPT judges samples of every model, all
started from BOS, all num_samples x sample_len: the GPT at --gpt_temperatures, each diffusion model at every
--sample_steps x --temperatures. A judge trained here favours its own samples, and low-entropy (repetitive) samples
get a good generative perplexity, so read the perplexity next to the unigram entropy; validation text gives the
reference point, and samples of the training split's unigram and bigram statistics show where text with only those
statistics lands.

Writes to --out_dir: compare.md (the report), compare.json (every number), bpb_vs_flops.png, frontier.png, and each
run's checkpoints and training report in a folder named after its model (a rerun trains them afresh there).
Single process (one device). --reuse skips the training of a model whose run in --out_dir is finished with the
very same flags (e.g. to rerun only one model with new --diffusion_args); a damaged run is named and trained again.
Every flag, and every flag passed on, is checked before anything is trained.
"""

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import shlex
import time

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from nanochat import train as trainer
from nanochat.checkpoint import MODEL_TYPES, best_path, checkpoint_path, load_model, read_checkpoint, read_state, state_path
from nanochat.common import (
    UserError, autocast_for, check_seed, check_writable, compute_init, finite, fmt, median_times, peak_flops, run_main, sync,
)
from nanochat.dataloader import DataLoader
from nanochat.evaluate import evaluate_bpb
from nanochat.ngram import NGram
from nanochat.report import device_name, git_commit  # (selects matplotlib's Agg backend: no display needed)
from nanochat.sample_quality import judge_figures, sample_quality
from nanochat.sampling import add_sampler_args, decode, generate, sampler_options, sampler_settings

# validation evaluations per run along the way, besides the one at step 0: the GPT's exact evaluation costs one
# forward pass, a diffusion model's bound costs bound_samples of them, so the GPT's curve gets 3x the points
EVAL_POINTS = {"gpt": 24}
OTHER_EVAL_POINTS = 8
NGRAM_TOKENS = 2**22  # training tokens (at most one pass) counted by the unigram and bigram references
# diffusion_train flags that compare sets for every run, refused in --{model}_args: the same shape, batch, data,
# seed and device for all, the steps and evaluations from the budget, the checkpoints in --out_dir
COMPARE_SETS = {"model", "depth", "max_seq_len", "device_batch_size", "total_batch_size", "data_dir", "tokenizer_dir",
                "eval_tokens", "num_iterations", "eval_every", "sample_every", "save_every", "checkpoint_dir", "resume",
                "overwrite", "seed", "device_type", "compile", "dtype"}


def number_list(cast):
    return lambda s: [cast(x) for x in s.split(",") if x.strip()]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training FLOPs per model")
    budget.add_argument("--minutes", type=float, help="minutes of GPT training on this device, as a FLOPs budget for each")
    a("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=list(MODEL_TYPES),
      help=f"comma-separated, the gpt among them (the judge); default {','.join(MODEL_TYPES)}")
    # the shared shape, batch and data (as in scripts.diffusion_train)
    a("--depth", type=int, default=12)
    a("--max_seq_len", type=int, default=1024)
    a("--device_batch_size", type=int, default=32)
    a("--total_batch_size", type=int, default=-1, help="tokens per step; -1 = device_batch_size * max_seq_len")
    a("--data_dir", default=None, help="parquet shards (default: $NANOCHAT_BASE_DIR/base_data)")
    a("--tokenizer_dir", default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    a("--eval_tokens", type=int, default=None, help="validation tokens per evaluation (default: diffusion_train's)")
    for m in MODEL_TYPES:
        a(f"--{m}_args", default="", help=f'extra diffusion_train flags for the {m} model, e.g. "--matrix_lr 0.01"')
    a("--final_eval_tokens", type=int, default=2**16, help="validation tokens of the evaluation at the end of training")
    a("--out_dir", default="compare_out")
    # samples
    a("--num_samples", type=int, default=64, help="samples per setting")
    a("--sample_len", type=int, default=256, help="tokens per sample, BOS included (capped at max_seq_len)")
    a("--sample_steps", type=number_list(int), default=[8, 32, 128, 512], help="denoising step counts, comma-separated")
    a("--temperatures", type=number_list(float), default=[1.0, 0.8, 0.6], help="the diffusion models' sampling temperatures")
    a("--gpt_temperatures", type=number_list(float), default=[1.0, 0.8], help="GPT sampling temperatures")
    a("--sample_batch_size", type=int, default=None, help="samples per generate() call (default: all at once)")
    a("--num_show", type=int, default=3, help="decoded samples per setting in the report")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--seed", type=int, default=42)
    a("--reuse", action="store_true", help="keep a model's finished run in --out_dir if it had the same flags")
    add_sampler_args(p, conditioning=False)
    return p.parse_args(argv)


def check_args(args):
    """Every flag, and the diffusion_train flags of every run, before anything is trained."""
    unknown = sorted(set(args.models) - set(MODEL_TYPES))
    if unknown or "gpt" not in args.models or len(set(args.models)) != len(args.models):
        raise UserError(f"--models {','.join(args.models)}: name each of {', '.join(MODEL_TYPES)} at most once, the gpt "
                        f"among them (it judges the samples)")
    budget = args.flops if args.flops is not None else args.minutes
    if not (math.isfinite(budget) and budget > 0):
        raise UserError(f"the budget (--flops or --minutes) must be finite and > 0, got {budget}")
    for name in ("depth", "max_seq_len", "device_batch_size", "num_samples", "final_eval_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sample_batch_size is not None and args.sample_batch_size < 1:
        raise UserError(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}")
    if args.num_show < 0:
        raise UserError(f"--num_show must be >= 0, got {args.num_show}")
    if args.sample_len < 2:
        raise UserError(f"--sample_len must be >= 2 (BOS + at least one token), got {args.sample_len}")
    if not args.sample_steps:
        raise UserError("--sample_steps needs step counts, e.g. 8,32,128,512")
    if not args.temperatures or not args.gpt_temperatures:
        raise UserError("--temperatures and --gpt_temperatures need values, e.g. 1.0,0.8")
    for setting in sample_settings(args):
        sampler_settings(MODEL_TYPES[setting["model"]][1], setting["temperature"], setting["options"])
    check_seed(args.seed)
    check_writable(args.out_dir, "--out_dir")
    for model_type in args.models:
        targs = train_args(args, model_type)
        try:
            trainer.check_args(targs)
        except UserError as e:  # e.g. a rate passed on in --diffusion_args
            raise UserError(f"the {model_type} run: {e}") from None


# -----------------------------------------------------------------------------
# the plan: equal FLOPs

def train_argv(args, model_type, num_iterations):
    """diffusion_train flags for one run: shared shape, batch, data and seed; EVAL_POINTS of evaluations;
    its checkpoints afresh in --out_dir; then the run's own --{model_type}_args."""
    argv = ["--model", model_type, "--depth", args.depth, "--max_seq_len", args.max_seq_len,
            "--device_batch_size", args.device_batch_size, "--total_batch_size", args.total_batch_size,
            "--num_iterations", num_iterations,
            "--eval_every", math.ceil(num_iterations / EVAL_POINTS.get(model_type, OTHER_EVAL_POINTS)),
            "--sample_every", 0, "--save_every", -1, "--checkpoint_dir", os.path.join(args.out_dir, model_type),
            "--overwrite", "--seed", args.seed, "--device_type", args.device_type]
    for flag in ("data_dir", "tokenizer_dir", "eval_tokens"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    argv += ["--compile"] if args.compile else []  # (add_sampler_args' flag: both models' training, the denoiser)
    argv += ["--dtype", args.dtype] if args.dtype else []
    return [str(x) for x in argv] + extra_argv(args, model_type)


def extra_argv(args, model_type):
    value = getattr(args, f"{model_type}_args")
    try:
        return shlex.split(value)
    except ValueError as e:  # e.g. an unclosed quote
        raise UserError(f"--{model_type}_args {value!r}: {e}") from None


def train_args(args, model_type, num_iterations=1):
    """The parsed diffusion_train flags of one run, or one UserError for --{model_type}_args: flags that
    diffusion_train does not take, bad values, or flags that compare sets itself (COMPARE_SETS)."""
    flag, value = f"--{model_type}_args", getattr(args, f"{model_type}_args")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # argparse writes what is wrong, then exits
            refused = sorted(trainer.flags_set(model_type, extra_argv(args, model_type)) & COMPARE_SETS)
            if refused:
                raise UserError(f"{flag} sets {', '.join('--' + f for f in refused)}, which compare sets itself (with "
                                f"its own flags of the same name, or from the budget and --out_dir)")
            return trainer.get_args(train_argv(args, model_type, num_iterations))
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise UserError(f"{flag} {value!r}: {message}") from None


def make_plan(args, device):
    """Training FLOPs per token of every model, tokens per step, the FLOPs budget and each model's steps."""
    targs = {m: train_args(args, m) for m in args.models}
    tokenizer = trainer.prepare_data_and_tokenizer(targs["gpt"], 0, False)  # trains one if missing
    vocab = tokenizer.get_vocab_size()
    configs = {m: trainer.model_config(a, vocab) for m, a in targs.items()}
    for m, config in configs.items():
        trainer.check_fits(targs[m], config, device)
    models = {m: MODEL_TYPES[m][1](config) for m, config in configs.items()}
    T = args.max_seq_len
    flops_per_token = {m: model.flops_per_token(T) for m, model in models.items()}
    tokens_per_step = args.total_batch_size if args.total_batch_size > 0 else args.device_batch_size * T
    plan = dict(flops_per_token=flops_per_token, tokens_per_step=tokens_per_step,
                num_params={m: model.num_params() for m, model in models.items()}, gpt_flops_per_s=None)
    if args.flops is not None:
        plan["budget_flops"] = args.flops
    else:  # the GPT's training FLOP/s on this device, from a few real steps of one micro-batch
        gpt = models["gpt"].to(device)
        tokens = torch.randint(0, vocab, (args.device_batch_size, T), device=device)
        step_s = median_times({"gpt": trainer.training_step(gpt, tokens, args.compile, args.dtype)}, 5, 2, device)["gpt"]
        plan["gpt_flops_per_s"] = flops_per_token["gpt"] * tokens.numel() / step_s
        plan["budget_flops"] = plan["gpt_flops_per_s"] * args.minutes * 60
        print(f"GPT training: {plan['gpt_flops_per_s']:.3e} FLOP/s -> {args.minutes} minutes = {plan['budget_flops']:.3e} FLOPs")
    plan["num_iterations"] = {m: max(1, int(plan["budget_flops"] // (f * tokens_per_step))) for m, f in flops_per_token.items()}
    return plan, tokenizer


def final_checkpoint(args, model_type, plan):
    return checkpoint_path(os.path.join(args.out_dir, model_type), model_type, plan["num_iterations"][model_type])


def same_run_flags(old, new):
    """Whether a run with the flags old trained what one with new would: its folder aside (a moved --out_dir stays
    reusable), and a flag newer than the run taken at its default."""
    defaults = vars(trainer.train_parser(new["model"]).parse_args([]))
    return all(old.get(k, defaults.get(k)) == v for k, v in new.items() if k not in ("checkpoint_dir", "keep_last"))


def can_reuse(args, model_type, plan):
    """Whether this model's run in --out_dir is complete and intact, with its best checkpoint, and was trained with
    the very flags that this comparison would give it."""
    path = final_checkpoint(args, model_type, plan)
    best_file = best_path(os.path.join(args.out_dir, model_type), model_type)
    if not all(os.path.isfile(f) for f in (path, state_path(path, 0), best_file)):
        return False
    try:
        ckpt, state, best_ckpt = read_checkpoint(path), read_state(state_path(path, 0)), read_checkpoint(best_file)
    except UserError as e:
        print(f"{model_type}: {e}; training it again")
        return False
    if not same_run_flags(ckpt["meta"].get("args", {}), vars(train_args(args, model_type, plan["num_iterations"][model_type]))):
        return False
    best = min(state["history"]["eval"], key=lambda e: e["val_bpb"])
    run_ids = {ckpt["meta"].get("run_id"), state.get("run_id"), best_ckpt["meta"].get("run_id")}
    return len(run_ids) == 1 and best_ckpt["step"] == best["step"]  # one run, its best not overwritten since


def read_run(args, model_type, plan, device, peak, tokenizer):
    """(model at the end of training, training results): the final evaluation on --final_eval_tokens, the
    evaluations along the run (and the best of them), tokens/s, MFU."""
    path = final_checkpoint(args, model_type, plan)
    history = read_state(state_path(path, 0))["history"]
    final = history["eval"][-1]
    best = min(history["eval"], key=lambda e: e["val_bpb"])  # a small corpus: the GPT can overfit before the end
    model, _, _ = load_model(path, device, expect=model_type)
    timed_steps = final["step"] - 1  # diffusion_train leaves the first (warm-up) step out of its time
    tok_per_s = plan["tokens_per_step"] * timed_steps / final["time"] if final["time"] > 0 else float("nan")
    return model, dict(checkpoint=path, num_iterations=final["step"], flops=final["flops"], train_seconds=final["time"],
                       final=final_evaluation(args, model, model_type, tokenizer, device), nll_kind=model.nll_kind,
                       best_val_bpb=best["val_bpb"], best_val_bpb_stderr=best["val_bpb_stderr"], best_step=best["step"],
                       tokens_per_s=tok_per_s, mfu=plan["flops_per_token"][model_type] * tok_per_s / peak,
                       evals=history["eval"])


def final_evaluation(args, model, model_type, tokenizer, device):
    """Bits per byte (with its standard error) on the first --final_eval_tokens of the val split, in batches of the
    runs' shape: the same tokens for every model (fewer if the split is smaller: the number used is reported)."""
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data_dir, device=device)
    batches = list(itertools.islice(loader, max(1, args.final_eval_tokens // (args.device_batch_size * args.max_seq_len))))
    print(f"{model_type}: final evaluation on {sum(b.numel() for b in batches):,} validation tokens")
    torch.manual_seed(args.seed)
    with autocast_for(device, args.dtype):
        return evaluate_bpb(model, tqdm(batches, desc=f"{model_type} final evaluation", unit="batch"), tokenizer.token_bytes(device))


# -----------------------------------------------------------------------------
# samples

def sample_settings(args):
    """Every (model, temperature, generate() options) to sample, with its label: each model that takes steps at every
    --sample_steps x --temperatures, the GPT at --gpt_temperatures. A sampler flag serves the models that have it."""
    settings = []
    for m in args.models:
        defaults = MODEL_TYPES[m][1].sampler_defaults
        if "num_steps" in defaults:
            options = lambda s: {k: v for k, v in sampler_options(args, num_steps=s).items() if k in defaults}
            settings += [dict(model=m, steps=s, temperature=t, options=options(s), label=f"{m} {s} steps T={t}")
                         for s in args.sample_steps for t in args.temperatures]
        else:
            settings += [dict(model=m, steps=None, temperature=t, options={}, label=f"{m.upper()} T={t}")
                         for t in args.gpt_temperatures]
    return settings


def run_setting(models, setting, args, num_samples, sample_len, bos, device, autocast):
    """(token ids (num_samples, sample_len) starting with BOS, wall seconds) for one sampling setting."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    sync(device)
    t0 = time.perf_counter()
    with autocast:
        ids = generate(models[setting["model"]], num_samples, sample_len, {0: bos}, setting["temperature"],
                       args.sample_batch_size, g, **setting["options"])
    sync(device)
    return ids, time.perf_counter() - t0


def validation_reference(args, tokenizer, judge, sample_len, device, autocast):
    """The metrics of num_samples blocks of validation text of sample_len tokens (None if the split is smaller)."""
    try:
        rows = next(DataLoader(tokenizer, args.num_samples, sample_len, "val", args.data_dir, device=device)).tolist()
    except StopIteration:
        return None
    with autocast:  # the first token is context, as BOS is for the samples: sample_len - 1 tokens scored
        q = sample_quality([r[1:] for r in rows]) | judge_figures(judge, rows)
    return dict(label="validation text", **q, examples=[tokenizer.decode(r) for r in rows[:args.num_show]])


def ngram_models(args, tokenizer, device):
    """The unigram and bigram models of (up to NGRAM_TOKENS of) the training split, each with its validation bits per
    byte on the very batches the training runs evaluate on: the floor a trained network should clear."""
    loader, rows = DataLoader(tokenizer, 1, args.max_seq_len, "train", args.data_dir), []
    while loader.epoch == 0 and len(rows) * args.max_seq_len < NGRAM_TOKENS:
        rows.append(next(loader))
    rows, vocab = torch.cat(rows), tokenizer.get_vocab_size()
    val = trainer.validation_batches(train_args(args, "gpt"), tokenizer, 0, 1, device)
    models = {name: NGram.fit(rows, order, vocab) for name, order in (("unigram", 1), ("bigram", 2))}
    token_bytes = tokenizer.token_bytes(device)
    scores = {name: dict(evaluate_bpb(m, val, token_bytes), mix=m.mix) for name, m in models.items()}
    return models, scores


def ngram_references(args, ngrams, tokenizer, judge, sample_len, autocast):
    """Samples with the counts' statistics and nothing more (num_samples x sample_len from BOS, judged as the
    models' samples are): where such text lands on the judge's scale."""
    bos, g, references = tokenizer.get_bos_token_id(), torch.Generator().manual_seed(args.seed), []
    for name, model in ngrams.items():
        samples = model.sample(args.num_samples, sample_len - 1, bos, g)
        with autocast:
            q = sample_quality(samples, judge, bos)
        references.append(dict(label=f"{name} samples (training split)", model="ngram", **q,
                               examples=[decode(tokenizer, s) for s in samples[:args.num_show]]))
    return references


def evaluate_samples(args, models, ngrams, tokenizer, device, autocast):
    sample_len = min(args.sample_len, args.max_seq_len)
    bos, n_out = tokenizer.get_bos_token_id(), args.num_samples * (sample_len - 1)
    settings = sample_settings(args)
    for setting in {s["model"]: s for s in settings}.values():  # warm-up, so that no setting pays for it
        run_setting(models, setting, args, 1, min(sample_len, 4), bos, device, autocast)
    results = []
    for setting in settings:
        print(f"sampling {args.num_samples} x {sample_len} tokens: {setting['label']}")
        ids, seconds = run_setting(models, setting, args, args.num_samples, sample_len, bos, device, autocast)
        with autocast:
            quality = sample_quality([row[1:] for row in ids.tolist()], models["gpt"], bos)
        results.append(dict(setting, seconds=seconds, tokens_per_s=n_out / seconds, **quality,
                            examples=[decode(tokenizer, row) for row in ids[:args.num_show].tolist()]))
    validation = validation_reference(args, tokenizer, models["gpt"], sample_len, device, autocast)
    references = ([validation] if validation else []) + ngram_references(args, ngrams, tokenizer, models["gpt"], sample_len, autocast)
    gpt_ref = next((r for r in results if r["model"] == "gpt" and r["temperature"] == 1.0), results[0])
    for r in results + references:
        r["nll_ratio"] = r["gen_nll"] / gpt_ref["gen_nll"]
        r["entropy_ratio"] = r["unigram_entropy_nats"] / gpt_ref["unigram_entropy_nats"]
    steps = "/".join(str(s) for s in args.sample_steps)
    samplers = {}
    for m, model in models.items():  # how each model sampled, its step counts aside
        options = sampler_settings(model, 1.0, {k: v for k, v in sampler_options(args).items() if k in model.sampler_defaults})
        samplers[m] = model.describe_sampler({**options, "num_steps": steps}) if "num_steps" in options else model.describe_sampler(options)
    return dict(sample_len=sample_len, num_samples=args.num_samples, output_tokens=n_out, samplers=samplers,
                ratios_relative_to=gpt_ref["label"], settings=results, references=references)


# -----------------------------------------------------------------------------
# the report

def plot_bpb(train, ngram, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, score), style in zip(ngram.items(), (":", "--")):
        ax.axhline(score["bpb"], color="gray", linestyle=style, label=f"{name} counts of the training split")
    for model_type, t in train.items():
        label, evals = f"{model_type} ({t['nll_kind']})", t["evals"]
        ax.errorbar([e["flops"] for e in evals], [e["val_bpb"] for e in evals], yerr=[e["val_bpb_stderr"] for e in evals],
                    marker="o", capsize=3, label=label)
    ax.set(xlabel="training FLOPs", ylabel="validation bits per byte", title="validation bits per byte vs training compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(samples, path):
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in samples["settings"] + samples["references"]:
        style = {"gpt": "s", "diffusion": "o", "masked": "D", "ngram": "x"}.get(r.get("model"), "*")
        color = {"gpt": "tab:blue", "diffusion": "tab:orange", "masked": "tab:green", "ngram": "tab:gray"}.get(r.get("model"), "black")
        ax.scatter(r["unigram_entropy_nats"], r["gen_ppl"], marker=style, color=color, s=120 if style == "*" else 40)
        ax.annotate(r["label"].replace(" steps", "s"), (r["unigram_entropy_nats"], r["gen_ppl"]),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set(xlabel="unigram entropy per sample (nats)", ylabel="generative perplexity (GPT judge)",
           title="samples: generative perplexity vs entropy\n(GPT squares, diffusion circles, masked diamonds, n-gram crosses, text star)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(result):
    """The report's tables as markdown lines (also printed as the final summary)."""
    train, plan = result["train"], result["plan"]
    lines = ["| model | params | FLOPs/token | steps | training FLOPs | val bpb at the end | / GPT's | best along the run (step) "
             "| tokens/s | MFU | training time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, t in train.items():
        f = t["final"]
        lines.append(f"| {m} | {plan['num_params'][m]:,} | {plan['flops_per_token'][m]:.3e} | {t['num_iterations']} | "
                     f"{t['flops']:.3e} | {fmt(f['bpb'])} ± {fmt(f['stderr'])} ({t['nll_kind']}) | "
                     f"{fmt(result['bpb_ratio'][m], '.3f')} | {fmt(t['best_val_bpb'])} ± {fmt(t['best_val_bpb_stderr'])} "
                     f"({t['best_step']}) | {fmt(t['tokens_per_s'], ',.0f')} | {fmt(100 * t['mfu'], '.2f')}% | {t['train_seconds']:.1f}s |")
    lines += ["", f"Bits per byte at the end of training on {max(t['final']['tokens'] for t in train.values()):,} validation tokens (the same "
              "for every model); the best along the run comes from the cheaper evaluations of the curves (a best-of-many "
              "pick flatters the model evaluated most often).", "",
              "Count-based references on the same validation tokens: " + ", ".join(
                  f"{name} {fmt(v['bpb'])} ± {fmt(v['stderr'])} bpb" for name, v in result["ngram"].items())
              + f" (bigram interpolated with the unigram, weight {result['ngram']['bigram']['mix']:.1f} chosen on held-out "
              "training text)", ""]
    s = result["samples"]
    lines += [f"Samples: {s['num_samples']} x {s['sample_len']} tokens per setting (from BOS, {s['output_tokens']:,} "
              f"output tokens), sampled with " + "; ".join(f"{m}: {how}" for m, how in s["samplers"].items())
              + f"; ratios relative to {s['ratios_relative_to']}.", "",
              "| setting | gen ppl | gen NLL | NLL ratio | unigram entropy | entropy ratio | distinct-2 | repetition (4-gram) "
              "| sampling seconds | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["settings"] + s["references"]:
        lines.append(f"| {r['label']} | {fmt(r['gen_ppl'], '.2f')} | {fmt(r['gen_nll'], '.3f')} ± {fmt(r['gen_nll_stderr'], '.3f')} | {fmt(r['nll_ratio'], '.3f')} | "
                     f"{fmt(r['unigram_entropy_nats'], '.3f')} | {fmt(r['entropy_ratio'], '.3f')} | "
                     f"{fmt(r['distinct_2'], '.3f')} | {fmt(r['repetition_rate_4gram'], '.3f')} | "
                     f"{fmt(r.get('seconds'), '.2f')} | {fmt(r.get('tokens_per_s'), ',.0f')} |")
    return lines


def write_markdown(result, path):
    plan, s = result["plan"], result["samples"]
    budget = (f"{plan['budget_flops']:.3e} training FLOPs per model" + (
        f" (= {result['args']['minutes']} minutes of GPT training at its measured {plan['gpt_flops_per_s']:.3e} FLOP/s)"
        if plan["gpt_flops_per_s"] else ""))
    most_steps = max(result["args"]["sample_steps"])
    shown = list({r["model"]: r for r in reversed(s["settings"]) if r["steps"] in (None, most_steps)}.values())[::-1]
    lines = [
        f"# {', '.join(result['args']['models'])} at equal training compute", "",
        f"- device: {result['device']}, git commit {result['git_commit']}",
        f"- shape: depth {result['args']['depth']}, max_seq_len {result['args']['max_seq_len']}, "
        f"{plan['tokens_per_step']:,} tokens per step; same data and seed",
        f"- budget: {budget}",
        "- " + ", ".join(f"{m}_args: `{result['args'][m + '_args'] or '(none)'}`" for m in result["args"]["models"]), "",
        "## Validation bits per byte vs training compute", "",
        "The GPT's value is exact; a diffusion model's is an upper bound (its likelihood bound).", "",
        "![bpb](bpb_vs_flops.png)", "",
        *tables(result), "",
        "## Sample quality: generative perplexity vs unigram entropy", "",
        "Every model is sampled at the end of its training. The judge is the GPT trained here, at the end of its "
        "training: it favours its own samples, and repetitive (low-entropy) samples get a low perplexity, so "
        "compare settings at similar entropy. The validation text is the reference point; samples of the training "
        "split's unigram and bigram statistics show where text with only those statistics lands.", "",
        "![frontier](frontier.png)", "",
        "## Samples", "",
    ]
    for r in shown + s["references"]:
        lines += [f"### {r['label']}", "", *[f"{i + 1}. `{text!r}`" for i, text in enumerate(r["examples"])], ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    os.makedirs(args.out_dir, exist_ok=True)
    plan, tokenizer = make_plan(args, device)
    for m in args.models:
        print(f"{m}: {plan['num_iterations'][m]} steps x {plan['tokens_per_step']:,} tokens x "
              f"{plan['flops_per_token'][m]:.3e} FLOPs/token")
    for m in sorted(args.models, key=lambda m: m != "gpt"):  # the GPT first: it is the judge
        if args.reuse and can_reuse(args, m, plan):
            print(f"{m}: reusing the finished run in {args.out_dir}/{m}")
        else:
            trainer.main(train_argv(args, m, plan["num_iterations"][m]))

    peak = peak_flops(device)
    runs = {m: read_run(args, m, plan, device, peak, tokenizer) for m in sorted(args.models, key=lambda m: m != "gpt")}
    models = {m: r[0] for m, r in runs.items()}
    train = {m: r[1] for m, r in runs.items()}
    autocast = autocast_for(device, args.dtype)
    ngrams, ngram_bpb = ngram_models(args, tokenizer, device)
    result = dict(args=vars(args), device=device_name(device), git_commit=git_commit(), peak_flops=peak, plan=plan,
                  train=train, bpb_ratio={m: t["final"]["bpb"] / train["gpt"]["final"]["bpb"] for m, t in train.items()},
                  best_bpb_ratio={m: t["best_val_bpb"] / train["gpt"]["best_val_bpb"] for m, t in train.items()}, ngram=ngram_bpb,
                  samples=evaluate_samples(args, models, ngrams, tokenizer, device, autocast))

    plot_bpb(train, ngram_bpb, os.path.join(args.out_dir, "bpb_vs_flops.png"))
    plot_frontier(result["samples"], os.path.join(args.out_dir, "frontier.png"))
    write_markdown(result, os.path.join(args.out_dir, "compare.md"))
    with open(os.path.join(args.out_dir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(finite(result), f, indent=2, ensure_ascii=False)
    print("\n" + "\n".join(tables(result)))
    print(f"\nwrote {args.out_dir}/compare.md, compare.json, bpb_vs_flops.png, frontier.png")


if __name__ == "__main__":
    run_main(main)
