"""
The training loop shared by scripts.diffusion_train (the command users run) and scripts.compare: flags, data and
tokenizer preparation, DDP, gradient accumulation, Muon + AdamW with warmup / warmdown, validation, samples,
checkpoints with exact resume, the run report and wandb. Any model of nanochat.checkpoint.MODEL_TYPES trains here
through the same interface (nanochat.transformer.LanguageModel); its config fields are flags of the same name.

Reproducibility: the global batch is split into world_size x grad_accum "slots"; each slot has its own
data stream (documents slot, slot + n_slots, ...) and its own noise seed per step. A run therefore computes
the same thing however the slots are spread over processes and accumulation steps (up to float
reduction order), and a resumed run continues exactly where it stopped.

No run loses work. Every flag, the model's size against the device's memory and the output folders are checked
before any work starts. A fresh run refuses a --checkpoint_dir that holds checkpoints of this model (--resume
continues that run, --overwrite deletes them); every file of a checkpoint carries the run's identity, and --resume
takes the newest intact checkpoint, naming a damaged one that it passes over. Ctrl-C or SIGTERM (a scheduler's
preemption) finishes the current step, saves a checkpoint and exits (code 130 / 143); a second one aborts at once.
A non-finite loss, gradient norm, evaluation or weights stop the run and a failed save (a full disk) leaves no
partial file: the last checkpoint stays as it was. --keep_last keeps the newest step checkpoints only.
"""

import argparse
import hashlib
import itertools
import math
import os
import signal
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import (
    MODEL_TYPES, best_path, checkpoint_path, complete_checkpoints, read_checkpoint, read_state, remove_checkpoint,
    remove_old_checkpoints, run_files, save_atomic, save_model_file, state_path,
)
from nanochat.common import (
    DTYPES, UserError, add_config_args, autocast_for, check_seed, check_writable, compute_cleanup, compute_init,
    config_from_args, device_memory, format_bytes, get_base_dir, init_wandb, peak_flops, print0,
)
from nanochat.dataloader import DataLoader
from nanochat.dataset import default_data_dir, download, label_values, split_files, text_iterator
from nanochat.evaluate import evaluate_bpb, evaluate_loss
from nanochat.optim import learning_rates, setup_optimizers
from nanochat.report import write_report
from nanochat.tokenizer import Tokenizer, get_tokenizer

LR_HELP = dict(matrix_lr="Muon, hidden matrices", embedding_lr="AdamW, token embeddings", head_lr="AdamW, output head",
               other_lr="AdamW, projections, time MLP, adaLN", mix_lr="AdamW, local mixing (--local_mix)")
# the values below 1 that the --*_every flags take, and what they mean
EVERY_SPECIAL = dict(eval_every={-1: "only at the end"}, save_every={-1: "only at the end"},
                     sample_every={-1: "only at the end", 0: "never"})
PRIOR_TOKENS = 2**20  # training tokens counted for a model's unigram prior
BYTES_PER_PARAMETER = 16  # fp32 weights and gradients, AdamW's two moments (Muon keeps one)


def train_parser(model, description=__doc__):
    """The parser of the flags of one model type: its config fields and learning rates come from its class."""
    config_cls, model_cls = MODEL_TYPES[model]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", choices=list(MODEL_TYPES), default="diffusion", help="diffusion (continuous), gpt (the autoregressive "
      "baseline) or masked (MDLM); each has its own model flags and learning rates: see --model gpt --help")
    add_config_args(p, config_cls, skip={"vocab_size"})
    # data
    a("--data_dir", default=None, help="folder of parquet shards (default: $NANOCHAT_BASE_DIR/base_data, downloaded if empty)")
    a("--tokenizer_dir", default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer (trained on the data if missing)")
    a("--vocab_size", type=int, default=65536, help="vocabulary size when a tokenizer has to be trained")
    a("--num_shards", type=int, default=8, help="train shards to download when the default data dir is empty")
    a("--label_column", default=None, help="diffusion: condition on this column of the shards (a document's class, e.g. "
      "source), dropped to 'no label' on --label_dropout of the rows; its values over the train split become the "
      "checkpoint's labels, for --label and --guidance when sampling")
    # optimisation
    a("--num_iterations", type=int, default=5000)
    a("--device_batch_size", type=int, default=32)
    a("--total_batch_size", type=int, default=-1, help="tokens per step; -1 = device_batch_size * max_seq_len * world_size")
    for name, rate in learning_rates(model_cls).items():
        a(f"--{name}", type=float, default=rate, help=f"{LR_HELP[name]} (default for {model}: {rate})")
    a("--warmup_ratio", type=float, default=0.0)
    a("--warmdown_ratio", type=float, default=0.2)
    a("--final_lr_frac", type=float, default=0.0)
    a("--grad_clip", type=float, default=1.0, help="0 = off")
    # evaluation, samples, checkpoints, logging
    a("--eval_every", type=int, default=250, help="-1 = only at the end")
    a("--eval_tokens", type=int, default=None, help="validation tokens per evaluation (default: 2^20 on GPU, 2^13 on CPU)")
    a("--sample_every", type=int, default=1000, help="-1 = only at the end, 0 = never")
    a("--save_every", type=int, default=1000, help="-1 = only at the end")
    a("--checkpoint_dir", default="checkpoints")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint_dir")
    a("--overwrite", action="store_true", help="start afresh in a --checkpoint_dir that holds checkpoints of this model: "
      "delete them first")
    a("--keep_last", type=int, default=3, help="step checkpoints kept, the newest (the best one is always kept); 0 = all")
    a("--run", default="dummy", help="wandb run name; 'dummy' = no wandb")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--dtype", choices=DTYPES, default=None, help="bfloat16: bf16 autocast (the default on CUDA); float32 (the default elsewhere)")
    a("--seed", type=int, default=42)
    return p


def get_args(argv=None, description=__doc__):
    """The flags of the model that --model names."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=list(MODEL_TYPES), default="diffusion")
    model = pre.parse_known_args(argv)[0].model
    p = train_parser(model, description)
    flags = lambda config_cls: {f.name for f in fields(config_cls) if "help" in f.metadata}  # its knobs
    own = flags(MODEL_TYPES[model][0])
    for flag in (a.split("=")[0][2:] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")):
        owners = [m for m, (c, _) in MODEL_TYPES.items() if flag not in own and flag in flags(c)]
        if owners:  # a flag of another model: say whose it is
            p.error(f"--{flag} is a flag of the {' / '.join(owners)} model, not of --model {model}")
    return p.parse_args(argv)


def flags_set(model_type, argv):
    """The diffusion_train flags (their names) that argv sets, abbreviated or as --flag=value too."""
    parser = train_parser(model_type)
    unset = object()
    parser.set_defaults(**{name: unset for name in vars(parser.parse_known_args([])[0])})
    return {name for name, v in vars(parser.parse_known_args(argv)[0]).items() if v is not unset}


def check_args(args):
    """Every flag, before any work starts (the model's size against the device's memory: check_fits, once the
    tokenizer's vocabulary is known)."""
    for name in ("num_iterations", "device_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.total_batch_size < 1 and args.total_batch_size != -1:
        raise UserError(f"--total_batch_size must be >= 1, or -1 (one device batch per rank), got {args.total_batch_size}")
    for name in (*optimizer_rates(args), "grad_clip"):
        check_number(args, name, 0, math.inf)
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        check_number(args, name, 0, 1)
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError("--warmup_ratio + --warmdown_ratio must be at most 1")
    for name, special in EVERY_SPECIAL.items():
        if getattr(args, name) < 1 and getattr(args, name) not in special:
            meanings = ", ".join(f"{v} = {meaning}" for v, meaning in special.items())
            raise UserError(f"--{name} must be >= 1 ({meanings}), got {getattr(args, name)}")
    if args.keep_last < 0:
        raise UserError(f"--keep_last must be >= 0 (0 = keep every checkpoint), got {args.keep_last}")
    if args.eval_tokens is not None and args.eval_tokens < 1:
        raise UserError("--eval_tokens must be >= 1")
    check_seed(args.seed)
    if args.label_column and args.model != "diffusion":
        raise UserError(f"--label_column: attribute conditioning is built into the diffusion model only, not --model {args.model}")
    model_config(args, args.vocab_size)  # the model flags, checked before any data is read
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --checkpoint_dir and --overwrite deletes it: pass one of them")
    check_writable(args.checkpoint_dir, "--checkpoint_dir")
    found = run_files(args.checkpoint_dir, args.model)
    if found and not (args.resume or args.overwrite):  # two runs' files in one folder would pass for one run
        shown = ", ".join(os.path.basename(f) for f in found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"--checkpoint_dir {args.checkpoint_dir} holds another {args.model} run ({shown}): continue it "
                        f"with --resume, delete its {args.model} checkpoints with --overwrite, or choose another folder")


def check_number(args, name, low, high):
    value = getattr(args, name)
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise UserError(f"--{name} must be finite and {bounds}, got {value}")


def model_config(args, vocab_size, **values):
    try:
        return config_from_args(MODEL_TYPES[args.model][0], args, vocab_size=vocab_size, **values)
    except ValueError as e:
        raise UserError(f"bad model settings: {e}") from None


def check_fits(args, config, device):
    """One UserError unless the model's weights, gradients and optimiser state (BYTES_PER_PARAMETER) and buffers
    fit in the device's memory. The model is built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = MODEL_TYPES[args.model][1](config)
    needed = BYTES_PER_PARAMETER * model.num_params() + sum(b.numel() * b.element_size() for b in model.buffers())
    available = device_memory(device)
    if needed > available:
        raise UserError(f"a {args.model} model of --depth {config.depth} and --max_seq_len {config.max_seq_len} "
                        f"({model.num_params():,} parameters) needs about {format_bytes(needed)} for its weights, "
                        f"gradients, optimiser state and buffers, more than the {format_bytes(available)} of "
                        f"{device.type} memory: lower --depth or --max_seq_len")


def prepare_data_and_tokenizer(args, rank, ddp):
    """Download the default shards / train the tokenizer when they are missing (rank 0), then load.
    A UserError on rank 0 is passed to every rank, so that none waits for it forever."""
    error = None
    if rank == 0:
        try:
            if args.data_dir is None and (not os.path.isdir(default_data_dir()) or not os.listdir(default_data_dir())):
                print0(f"no data in {default_data_dir()}: downloading {args.num_shards} FineWeb-Edu shards (or pass --data_dir)")
                download(args.num_shards)
            split_files("val", args.data_dir)  # at least a train and a val shard
            tok_dir = args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
            if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
                check_writable(tok_dir, "--tokenizer_dir")
                print0(f"no tokenizer in {tok_dir}: training one with vocab_size {args.vocab_size} on the training split "
                       f"(or train one first with: python -m scripts.tok_train)")
                t0 = time.time()
                Tokenizer.train_from_iterator(text_iterator(args.data_dir, 2_000_000_000, 10_000), args.vocab_size).save(tok_dir)
                print0(f"tokenizer trained in {time.time() - t0:.1f}s, saved to {tok_dir}")
        except UserError as e:
            error = str(e)
    if ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return get_tokenizer(args.tokenizer_dir)


def optimizer_rates(args):
    """The learning-rate flags, as setup_optimizers takes them."""
    return {name: getattr(args, name) for name in learning_rates(MODEL_TYPES[args.model][1])}


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def noise_seed(seed, step, slot):
    """The RNG seed of one slot's micro-batch at one step: independent of how slots map to processes
    (and, unlike hash(), of the Python version and platform)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{slot}".encode(), digest_size=6).digest(), "little")


class StopRequest:
    """Handler of SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption; torchrun forwards both to its workers). The
    first signal only records which it was: the loop finishes its step, saves and stops (every rank at the same step).
    Another signal more than a second later aborts at once; the one torchrun forwards right after the terminal's is
    ignored. (No printing here: a handler may interrupt a print.)"""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.time = None
        self.signum = None

    def __call__(self, signum, frame):
        if self.time is None:
            self.time, self.signum = time.time(), signum
        elif time.time() - self.time > 1.0:
            raise KeyboardInterrupt

    def install(self):
        """The previous handlers, for uninstall; none outside the main thread (where signals keep their defaults)."""
        try:
            return {s: signal.signal(s, self) for s in self.SIGNALS}
        except ValueError:
            return {}

    @staticmethod
    def uninstall(previous):
        for s, handler in previous.items():
            signal.signal(s, handler)


def format_eta(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@torch.no_grad()
def sample_texts(model, tokenizer, num_samples, seq_len, seed):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    bos = tokenizer.get_bos_token_id()
    ids = model.generate(num_samples, seq_len, {0: bos}, generator=g)
    return [tokenizer.decode([t for t in row.tolist() if t != bos]) for row in ids]


def main(argv=None, description=__doc__, build=None):
    """build(config, device): the model to train (default: a fresh one of --model; scripts.diffusion_distill passes
    a student that holds its teacher)."""
    args = get_args(argv, description)
    check_args(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        train(args, ddp, rank, world_size, device, build)
    finally:
        compute_cleanup()


@dataclass
class Run:
    """What stays fixed while a run trains: its flags, processes, batch layout, tokenizer, model and optimisers."""
    args: argparse.Namespace
    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    grad_accum: int
    tokenizer: Tokenizer
    model: torch.nn.Module  # the model itself, not its DDP / compiled wrapper
    optimizers: list


@dataclass
class Progress:
    """What changes while a run trains; a state file saves all of it but last_path."""
    run_id: str  # made by a fresh run, kept by a resumed one: every file of a checkpoint carries it
    loader_states: list  # every data loader's state at the start of `step`
    step: int = 0
    history: dict = field(default_factory=lambda: {"train": [], "eval": []})
    total_time: float = 0.0  # seconds of training, the first step of each process left out
    last_path: str = None  # the newest checkpoint this process wrote


def accumulation_steps(args, world_size):
    """Micro-batches per rank and step: --total_batch_size over what the ranks take in one forward pass."""
    tokens_per_fwd = args.device_batch_size * args.max_seq_len * world_size
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else tokens_per_fwd
    if total_batch_size % tokens_per_fwd:
        raise UserError(f"--total_batch_size {total_batch_size} must be a multiple of device_batch_size * max_seq_len * "
                        f"world_size = {args.device_batch_size} * {args.max_seq_len} * {world_size} = {tokens_per_fwd}")
    return total_batch_size // tokens_per_fwd


def train(args, ddp, rank, world_size, device, build=None):
    # the batch layout, data, tokenizer and model, all checked before anything is allocated
    grad_accum = accumulation_steps(args, world_size)
    tokens_per_fwd = args.device_batch_size * args.max_seq_len
    total_batch_size = tokens_per_fwd * world_size * grad_accum
    tokenizer = prepare_data_and_tokenizer(args, rank, ddp)
    token_bytes = tokenizer.token_bytes(device)
    labels = {"labels": label_values(args.label_column, args.data_dir)} if args.label_column else {}
    config = model_config(args, tokenizer.get_vocab_size(), **labels)
    check_fits(args, config, device)

    # the model and optimisers, fresh or from the checkpoint that --resume continues
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = (build or MODEL_TYPES[args.model][1].build)(config, device)  # on the meta device, then its weights on `device`
    run = Run(args, ddp, rank, world_size, device, grad_accum, tokenizer, model, setup_optimizers(model, **optimizer_rates(args)))
    if args.resume:
        progress = resume(run)
    else:
        progress = Progress(run_id=new_run_id(ddp), loader_states=[None] * grad_accum)
        # the same training tokens on every rank: identical models
        prior_loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data_dir, device=device,
                                  label_column=args.label_column, labels=config.labels if args.label_column else ())
        model.fit_unigram_prior(itertools.islice(prior_loader, max(1, PRIOR_TOKENS // tokens_per_fwd)))
    start_step = progress.step

    # this rank's training streams and validation batches
    n_slots = world_size * grad_accum
    slots = [m * world_size + rank for m in range(grad_accum)]  # this rank's micro-batches, in order
    loaders = [DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data_dir, rank=slot,
                          world_size=n_slots, seed=args.seed, device=device, state=state, label_column=args.label_column,
                          labels=config.labels if args.label_column else ())
               for slot, state in zip(slots, progress.loader_states)]
    val_batches = validation_batches(args, tokenizer, rank, world_size, device)
    num_val = torch.tensor(float(len(val_batches)), device=device)
    if ddp:
        dist.all_reduce(num_val)
    if num_val.item() == 0:
        raise UserError(f"the validation split (the last shard) has fewer than {tokens_per_fwd} tokens per rank: "
                        f"lower --device_batch_size / --max_seq_len, or add data")

    # the model as it trains (compiled, DDP), and what the log reports
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_per_token = model.flops_per_token(args.max_seq_len)
    peak = peak_flops(device) * world_size
    wandb_run = init_wandb(args.run, rank, vars(args) | {"model_config": config.to_dict()})
    print0(f"{args.model}: {model.num_params():,} parameters, {flops_per_token:.3e} training FLOPs/token, "
           f"vocab {config.vocab_size}, device {device}, world size {world_size}")
    if args.label_column:
        print0(f"labels ({args.label_column}): {', '.join(config.labels)}; dropped on {config.label_dropout:.0%} of the rows")
    print0(f"batch: {total_batch_size:,} tokens/step = {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks "
           f"x {grad_accum} accumulation steps; {int(num_val.item()) * tokens_per_fwd:,} validation tokens")
    if args.overwrite and rank == 0:  # the last moment before this run writes: every check has passed
        for f in run_files(args.checkpoint_dir, args.model):
            os.remove(f)

    # the loop's state: the loaders' at the start of the step, the smoothed loss, the step saved last
    progress.loader_states = [l.state_dict() for l in loaders]
    smooth_loss = None
    for _, loss in progress.history["train"]:
        smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
    saved_step = start_step if args.resume else None
    last = lambda s: s == args.num_iterations
    stop = StopRequest()
    previous_handlers = stop.install()
    try:
        while True:
            step = progress.step
            # evaluate every --eval_every steps and at the end (not again right after resuming at an evaluated step)
            evaluated = bool(progress.history["eval"]) and progress.history["eval"][-1]["step"] == step
            if ((args.eval_every > 0 and step % args.eval_every == 0) or last(step)) and not evaluated:
                val = evaluate(run, progress, val_batches, token_bytes, step * total_batch_size * flops_per_token)
                wandb_run.log({"step": step, "val/loss": val["loss"], "val/bpb": val["bpb"]})
            # print samples every --sample_every steps and at the end
            if rank == 0 and ((args.sample_every > 0 and step > start_step and step % args.sample_every == 0)
                              or (args.sample_every != 0 and last(step))):
                print_samples(run)
            # save every --save_every steps and at the end
            if step != saved_step and (last(step) or (args.save_every > 0 and step % args.save_every == 0 and step > 0)):
                progress.last_path = save_checkpoint(run, progress)
                saved_step = step
            if last(step):  # the end: evaluated, sampled and saved
                break

            # one optimisation step over grad_accum micro-batches
            t0 = time.time()
            lrm = lr_multiplier(step, args.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            train_loss, stop_code = optimisation_step(run, progress, train_model, loaders, slots, lrm, stop)
            dt = time.time() - t0

            # the run's progress, and one log line
            progress.step += 1
            progress.loader_states = [l.state_dict() for l in loaders]
            if progress.step > start_step + 1:  # the first step includes warm-up / compilation
                progress.total_time += dt
            progress.history["train"].append([progress.step, train_loss])
            smooth_loss = train_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * train_loss
            timed_steps = progress.step - start_step - 1
            seconds_per_step = progress.total_time / timed_steps if timed_steps > 0 else dt
            eta = (args.num_iterations - progress.step) * seconds_per_step
            tok_per_s = total_batch_size / dt
            mfu = 100 * flops_per_token * tok_per_s / peak
            print0(f"step {progress.step:05d}/{args.num_iterations} | loss {train_loss:.4f} (smooth {smooth_loss:.4f}) | "
                   f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu:.2f}% | eta {format_eta(eta)}")
            wandb_run.log({"step": progress.step, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_s,
                           "train/mfu": mfu})

            # Ctrl-C or SIGTERM on any rank: save at this step and stop
            if stop_code:
                how = "terminated (SIGTERM)" if stop_code == 128 + signal.SIGTERM else "interrupted"
                print0(f"{how} at step {progress.step}: saving a checkpoint (continue with --resume)")
                if progress.step != saved_step:
                    progress.last_path = save_checkpoint(run, progress)
                wandb_run.finish()
                if stop_code == 128 + signal.SIGTERM:
                    sys.exit(stop_code)
                raise KeyboardInterrupt
    finally:
        stop.uninstall(previous_handlers)

    # the run report (curves, final evaluation, samples) beside the checkpoints
    if rank == 0:
        timed_steps = progress.step - start_step - 1
        tokens_per_second = total_batch_size * timed_steps / progress.total_time if progress.total_time else None
        report = write_report(args.checkpoint_dir, args.model, vars(args), model, progress.history, device,
                              samples=sample_texts(model.eval(), tokenizer, 3, min(64, args.max_seq_len), args.seed),
                              tokens_per_second=tokens_per_second)
        print0(f"report: {report}")
    wandb_run.finish()
    print0(f"done: {progress.step} steps, {progress.total_time / 60:.2f} min of training, last checkpoint {progress.last_path}")


def new_run_id(ddp):
    """A fresh run's identity: rank 0's, on every rank."""
    box = [uuid.uuid4().hex]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def kept(progress):
    """What a stopped run leaves behind, for its error message."""
    if progress.last_path:
        return f"the last good checkpoint is {progress.last_path}"
    return "no checkpoint was written in this run"


def nonfinite_error(run, progress, what, action):
    return UserError(f"{what} at step {progress.step}; {action} ({kept(progress)}). Try lower learning rates "
                     f"({', '.join('--' + k for k in optimizer_rates(run.args))})"
                     + ("" if run.args.grad_clip > 0 else " or --grad_clip 1.0"))


def print_samples(run):
    run.model.eval()
    with autocast_for(run.device, run.args.dtype):
        for text in sample_texts(run.model, run.tokenizer, 2, min(64, run.args.max_seq_len), run.args.seed):
            print0(f"sample: {text!r}")
    run.model.train()


def weights_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def evaluate(run, progress, val_batches, token_bytes, flops):
    """Validation loss and bits per byte at progress.step, appended to the history; the weights go to
    {model}_best.pt when they score the lowest bpb so far (early stopping's pick). A non-finite result stops the run."""
    model, args = run.model, run.args
    model.eval()
    torch.manual_seed(args.seed + 1000 + run.rank)  # the same noise at every evaluation: comparable curves
    with autocast_for(run.device, run.args.dtype):
        val = evaluate_bpb(model, val_batches, token_bytes)
        val["loss"] = evaluate_loss(model, val_batches)
    model.train()
    for name, value in (("loss", val["loss"]), ("bpb", val["bpb"])):
        if not math.isfinite(value):
            raise nonfinite_error(run, progress, f"the validation {name} is {value}", "stopping")
    evals = progress.history["eval"]
    evals.append(dict(step=progress.step, flops=flops, time=progress.total_time, val_loss=val["loss"], val_bpb=val["bpb"],
                      val_bpb_stderr=val["stderr"]))
    print0(f"step {progress.step:05d} | val loss {val['loss']:.4f} | val bpb {val['bpb']:.4f} ± {val['stderr']:.4f}")
    if run.rank == 0 and all(val["bpb"] < e["val_bpb"] for e in evals[:-1]):
        if not weights_finite(model):
            raise nonfinite_error(run, progress, "the weights are not finite", "stopping without saving them")
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        try:
            save_model_file(best_path(args.checkpoint_dir, args.model), progress.step, model, args.model, run.tokenizer,
                            meta={"args": vars(args), "val_bpb": val["bpb"], "run_id": progress.run_id})
        except UserError as e:
            raise UserError(f"{e}; {kept(progress)}") from None
    return val


def optimisation_step(run, progress, train_model, loaders, slots, lrm, stop):
    """Forward and backward over this rank's micro-batches, then (loss and gradients finite) the update at lrm times
    the learning rates. Returns the mean loss over all ranks and the exit code of a stop request on any rank (0: none)."""
    args, model = run.args, run.model
    stats = torch.zeros(3, device=run.device)  # summed micro-batch losses, SIGINT requests, SIGTERM requests
    for m, loader in enumerate(loaders):
        batch = next(loader)  # tokens, or (tokens, labels) with --label_column
        torch.manual_seed(noise_seed(args.seed, progress.step, slots[m]))
        sync = nullcontext() if not run.ddp or m == run.grad_accum - 1 else train_model.no_sync()
        with sync:
            with autocast_for(run.device, run.args.dtype):
                loss = train_model(*batch) if isinstance(batch, tuple) else train_model(batch)
            (loss / run.grad_accum).backward()
        stats[0] += loss.detach()
    stats[1] = float(stop.signum == signal.SIGINT)
    stats[2] = float(stop.signum == signal.SIGTERM)
    if run.ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # every rank sees the same loss and stop decision
    # the gradient norm (the same on every rank) is read back with the loss and the stops: one host sync per step
    no_clip = torch.zeros((), device=run.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip) if args.grad_clip > 0 else no_clip
    loss_sum, sigints, sigterms, grad_norm = torch.cat([stats, grad_norm.reshape(1).to(stats.dtype)]).tolist()
    train_loss = loss_sum / (run.grad_accum * run.world_size)
    if not math.isfinite(train_loss):
        raise nonfinite_error(run, progress, f"the training loss is {train_loss}", "stopping before the update")
    if not math.isfinite(grad_norm):
        raise nonfinite_error(run, progress, f"the gradient norm is {grad_norm}", "stopping before the update")
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        opt.step()
    model.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    stop_code = 128 + signal.SIGTERM if sigterms else 128 + signal.SIGINT if sigints else 0
    return train_loss, stop_code


def save_checkpoint(run, progress):
    """The checkpoint of progress.step: every rank's state file, then rank 0's model file, whose presence marks it
    complete; then the step checkpoints beyond --keep_last go. Non-finite weights are never saved, and a failed save
    leaves the previous checkpoint as it was. Returns the model file's path."""
    args = run.args
    if not weights_finite(run.model):  # the same weights on every rank: every rank stops here
        raise nonfinite_error(run, progress, "the weights are not finite", "stopping without saving them")
    path = checkpoint_path(args.checkpoint_dir, args.model, progress.step)
    if run.rank == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        if os.path.exists(path):  # a damaged one that --resume passed over: it must not vouch for the new state files
            os.remove(path)
    barrier(run)
    state = {"optimizers": [opt.state_dict() for opt in run.optimizers], "loaders": progress.loader_states,
             "world_size": run.world_size, "grad_accum": run.grad_accum, "history": progress.history,
             "total_time": progress.total_time, "run_id": progress.run_id}
    try:
        save_atomic(state, state_path(path, run.rank))
        barrier(run)
        if run.rank == 0:  # written last: its presence marks a complete checkpoint
            try:
                save_model_file(path, progress.step, run.model, args.model, run.tokenizer,
                                meta={"args": vars(args), "run_id": progress.run_id})
            except UserError:
                remove_checkpoint(path)  # the state files of a checkpoint that will never be complete
                raise
    except UserError as e:
        raise UserError(f"{e}; {kept(progress)}") from None
    if run.rank == 0:
        remove_old_checkpoints(args.checkpoint_dir, args.model, args.keep_last, progress.step)
        print0(f"saved {path}")
    return path


def barrier(run):
    if run.ddp:
        dist.barrier()


def training_step(model, tokens, compile=False, dtype=None):
    """A function doing one real training step of model on tokens (forward, backward, clipping, AdamW / Muon
    update at the model's default rates), for timing: scripts.bench and the --minutes budget of scripts.compare."""
    optimizers = setup_optimizers(model)
    forward = torch.compile(model) if compile else model
    autocast = autocast_for(tokens.device, dtype)
    model.train()

    def step():
        with autocast:
            loss = forward(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    return step


def validation_batches(args, tokenizer, rank, world_size, device):
    """This rank's validation batches: its share of the first --eval_tokens of the val split (default: 2^20 tokens
    on a GPU, 2^13 on a CPU), the same at every evaluation. Without labels: a labelled model is evaluated as the
    unconditional model (the null label), comparable with a model trained without --label_column."""
    eval_tokens = args.eval_tokens or (2**20 if device.type == "cuda" else 2**13)
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data_dir, rank=rank,
                        world_size=world_size, device=device)
    return list(next_batches(loader, max(1, eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))))


def next_batches(loader, n):
    for _, batch in zip(range(n), loader):
        yield batch


def resume(run):
    """The Progress of the newest intact checkpoint in --checkpoint_dir, whose weights and optimiser states are loaded
    into run's. A damaged checkpoint (an unreadable file, files of two runs) is named and passed over."""
    args = run.args
    candidates = complete_checkpoints(args.checkpoint_dir, args.model, run.world_size)
    if not candidates:
        raise UserError(f"--resume: no complete {args.model} checkpoint in {args.checkpoint_dir}; start without --resume")
    for path in candidates:
        ckpt, state, damage = read_resume_point(path, run.rank, args.model)
        if damage:  # printed by the rank that found it (each rank reads its own state file)
            print(f"note: {damage}; falling back to the newest intact checkpoint before it", flush=True)
        if on_every_rank(damage is None, run):
            break
    else:
        raise UserError(f"--resume: every {args.model} checkpoint in {args.checkpoint_dir} is damaged (see the notes "
                        f"above); start afresh with --overwrite")
    check_resume_point(run, path, ckpt, state)
    run.model.load_state_dict(ckpt["model"])
    rates = [[group["initial_lr"] for group in opt.param_groups] for opt in run.optimizers]
    try:
        for opt, sd in zip(run.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
    except ValueError as e:  # parameter groups that do not match this model's
        raise UserError(f"the optimiser state of {path} does not fit this version's parameter groups ({e}); "
                        f"resume with the version of the code that wrote it, or start a fresh run") from None
    for opt, group_rates in zip(run.optimizers, rates):  # a state dict carries its run's rates; this run's flags decide
        for group, rate in zip(opt.param_groups, group_rates):
            group["initial_lr"] = rate
    old_args = ckpt["meta"].get("args", {})
    changed = sorted(k for k, v in vars(args).items() if k in old_args and old_args[k] != v and k not in RESUME_FREE_ARGS)
    if changed:
        print0("note: continuing with settings that differ from the checkpoint's: "
               + ", ".join(f"--{k} {old_args[k]} -> {getattr(args, k)}" for k in changed))
    print0(f"resumed from {path} at step {ckpt['step']}")
    return Progress(run_id=state.get("run_id"), loader_states=state["loaders"], step=ckpt["step"],
                    history=state["history"], total_time=state.get("total_time", 0.0))


def read_resume_point(path, rank, model_type):
    """(model file, this rank's state file, None), or (None, None, what is damaged)."""
    try:
        ckpt = read_checkpoint(path)
    except UserError as e:
        return None, None, str(e)
    if ckpt["model_type"] != model_type:  # not damage: a file copied under another model's name
        raise UserError(f"{path} is a {ckpt['model_type']} checkpoint; this run trains a {model_type} model")
    try:
        state = read_state(state_path(path, rank))
    except UserError as e:
        return None, None, str(e)
    if state.get("run_id") != ckpt["meta"].get("run_id"):
        return None, None, f"{state_path(path, rank)} comes from another run than {path}"
    return ckpt, state, None


def on_every_rank(ok, run):
    """Whether ok holds on every rank."""
    if not run.ddp:
        return ok
    flag = torch.tensor(float(ok), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


def check_resume_point(run, path, ckpt, state):
    """One UserError unless this run can continue the checkpoint: the same model, tokenizer and batch layout."""
    config = run.model.config.to_dict()
    if ckpt["config"] != config:
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        raise UserError(f"{path} was trained with another configuration (checkpoint vs now: {diff}); "
                        f"pass the same flags, or use another --checkpoint_dir")
    if ckpt["tokenizer"]["identity"] != run.tokenizer.identity:
        raise UserError(f"{path} was trained with another tokenizer than the one in --tokenizer_dir")
    if (state["world_size"], state["grad_accum"]) != (run.world_size, run.grad_accum):
        raise UserError(f"{path} was written by {state['world_size']} ranks x {state['grad_accum']} accumulation steps; "
                        f"resume with the same world size and batch settings")
    if ckpt["step"] > run.args.num_iterations:
        raise UserError(f"{path} is at step {ckpt['step']}, beyond --num_iterations {run.args.num_iterations}")


# flags that do not change what a resumed run computes
RESUME_FREE_ARGS = {"resume", "run", "checkpoint_dir", "data_dir", "tokenizer_dir", "num_shards", "vocab_size", "eval_every",
                    "eval_tokens", "sample_every", "save_every", "device_type", "compile", "keep_last", "overwrite"}
