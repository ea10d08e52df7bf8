"""
The training loop shared by scripts.diffusion_train (the command users run) and scripts.compare: flags, data and
tokenizer preparation, DDP, gradient accumulation, Muon + AdamW with warmup / warmdown, validation, samples,
checkpoints with exact resume, the run report and wandb. Any model of nanochat.checkpoint.MODEL_TYPES trains here
through the same interface (nanochat.transformer.LanguageModel); its config fields are flags of the same name.

Reproducibility: the global batch is split into world_size x grad_accum "slots"; each slot has its own
data stream (documents slot, slot + n_slots, ...) and its own noise seed per step. A run therefore computes
the same thing however the slots are spread over processes and accumulation steps (up to float
reduction order), and a resumed run continues exactly where it stopped.

Ctrl-C finishes the current step, saves a checkpoint and exits (code 130); a second Ctrl-C aborts at once.
A non-finite loss or gradient norm stops the run before the update, leaving the last checkpoint as it was.
"""

import argparse
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import (
    MODEL_TYPES, best_path, checkpoint_path, find_latest, read_checkpoint, save_atomic, save_model_file, state_path,
)
from nanochat.common import (
    UserError, add_config_args, autocast_for, compute_cleanup, compute_init, config_from_args, get_base_dir, init_wandb,
    peak_flops, print0,
)
from nanochat.dataloader import DataLoader
from nanochat.dataset import default_data_dir, download, split_files, text_iterator
from nanochat.evaluate import evaluate_bpb, evaluate_loss
from nanochat.muon import learning_rates, setup_optimizers
from nanochat.report import write_report
from nanochat.tokenizer import Tokenizer, get_tokenizer

LR_HELP = dict(matrix_lr="Muon, hidden matrices", embedding_lr="AdamW, token embeddings", head_lr="AdamW, output head",
               other_lr="AdamW, projections, time MLP, adaLN", mix_lr="AdamW, local mixing (--local_mix)")


def get_args(argv=None, description=__doc__):
    """The flags of the model that --model names (its config fields and learning rates come from its class)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=list(MODEL_TYPES), default="diffusion")
    model = pre.parse_known_args(argv)[0].model
    config_cls, model_cls = MODEL_TYPES[model]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", choices=list(MODEL_TYPES), default="diffusion", help="the diffusion model, or the autoregressive baseline "
      "(each has its own model flags and learning rates: see --model gpt --help)")
    add_config_args(p, config_cls, skip={"vocab_size"})
    # data
    a("--data_dir", default=None, help="folder of parquet shards (default: $NANOCHAT_BASE_DIR/base_data, downloaded if empty)")
    a("--tokenizer_dir", default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer (trained on the data if missing)")
    a("--vocab_size", type=int, default=65536, help="vocabulary size when a tokenizer has to be trained")
    a("--num_shards", type=int, default=8, help="train shards to download when the default data dir is empty")
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
    a("--run", default="dummy", help="wandb run name; 'dummy' = no wandb")
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=42)
    own = {f.name for f in fields(config_cls)}
    for flag in (a.split("=")[0][2:] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")):
        owners = [m for m, (c, _) in MODEL_TYPES.items() if flag not in own and flag in {f.name for f in fields(c)}]
        if owners:  # a flag of another model: say whose it is
            p.error(f"--{flag} is a flag of the {' / '.join(owners)} model, not of --model {model}")
    return p.parse_args(argv)


def check_args(args):
    for name in ("num_iterations", "device_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio + args.warmdown_ratio <= 1:
        raise UserError("--warmup_ratio + --warmdown_ratio must lie in [0, 1]")
    if args.eval_tokens is not None and args.eval_tokens < 1:
        raise UserError("--eval_tokens must be >= 1")
    model_config(args, args.vocab_size)  # the model flags, checked before any data is read


def model_config(args, vocab_size):
    try:
        return config_from_args(MODEL_TYPES[args.model][0], args, vocab_size=vocab_size)
    except ValueError as e:
        raise UserError(f"bad model settings: {e}") from None


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
    """SIGINT handler. The first Ctrl-C only sets a flag: the loop finishes its step, saves and stops (every
    rank at the same step). Another Ctrl-C more than a second later aborts at once; the one torchrun forwards
    right after the terminal's is ignored. (No printing here: a handler may interrupt a print.)"""

    def __init__(self):
        self.time = None

    def __call__(self, signum, frame):
        if self.time is None:
            self.time = time.time()
        elif time.time() - self.time > 1.0:
            raise KeyboardInterrupt


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


def main(argv=None, description=__doc__):
    args = get_args(argv, description)
    check_args(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        train(args, ddp, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, ddp, rank, world_size, device):
    tokens_per_fwd = args.device_batch_size * args.max_seq_len
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else tokens_per_fwd * world_size
    if total_batch_size % (tokens_per_fwd * world_size):
        raise UserError(f"--total_batch_size {total_batch_size} must be a multiple of device_batch_size * max_seq_len * "
                        f"world_size = {args.device_batch_size} * {args.max_seq_len} * {world_size} = {tokens_per_fwd * world_size}")
    grad_accum = total_batch_size // (tokens_per_fwd * world_size)
    tokenizer = prepare_data_and_tokenizer(args, rank, ddp)
    token_bytes = tokenizer.token_bytes(device)
    config = model_config(args, tokenizer.get_vocab_size())

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = MODEL_TYPES[args.model][1](config).to(device)
    optimizers = setup_optimizers(model, **optimizer_rates(args))
    start_step, loader_states, history, total_time = 0, [None] * grad_accum, {"train": [], "eval": []}, 0.0
    if args.resume:
        start_step, loader_states, history, total_time = resume(args, model, optimizers, config, tokenizer, rank, world_size, grad_accum)
    n_slots = world_size * grad_accum
    slots = [m * world_size + rank for m in range(grad_accum)]  # this rank's micro-batches, in order
    loaders = [DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data_dir, rank=slot,
                          world_size=n_slots, seed=args.seed, device=device, state=state)
               for slot, state in zip(slots, loader_states)]
    val_batches = validation_batches(args, tokenizer, rank, world_size, device)
    num_val = torch.tensor(float(len(val_batches)), device=device)
    if ddp:
        dist.all_reduce(num_val)
    if num_val.item() == 0:
        raise UserError(f"the validation split (the last shard) has fewer than {tokens_per_fwd} tokens per rank: "
                        f"lower --device_batch_size / --max_seq_len, or add data")

    raw_model = model
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_for(device)
    flops_per_token = raw_model.flops_per_token(args.max_seq_len)
    peak = peak_flops(device) * world_size
    wandb_run = init_wandb(args.run, rank, vars(args) | {"model_config": config.to_dict()})
    print0(f"{args.model}: {raw_model.num_params():,} parameters, {flops_per_token:.3e} training FLOPs/token, "
           f"vocab {config.vocab_size}, device {device}, world size {world_size}")
    print0(f"batch: {total_batch_size:,} tokens/step = {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks "
           f"x {grad_accum} accumulation steps; {int(num_val.item()) * tokens_per_fwd:,} validation tokens")

    step, smooth_loss, last_path, saved_step = start_step, None, None, start_step if args.resume else None
    loader_states = [l.state_dict() for l in loaders]  # always the loaders' state at the start of `step`
    for _, loss in history["train"]:
        smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss

    def save(step):
        path = checkpoint_path(args.checkpoint_dir, args.model, step)
        if rank == 0:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            if os.path.exists(path):  # from an older run: it must not vouch for the state files written next
                os.remove(path)
        if ddp:
            dist.barrier()
        save_atomic({"optimizers": [opt.state_dict() for opt in optimizers], "loaders": loader_states,
                     "world_size": world_size, "grad_accum": grad_accum, "history": history, "total_time": total_time},
                    state_path(path, rank))
        if ddp:
            dist.barrier()
        if rank == 0:  # written last: its presence marks a complete checkpoint
            save_model_file(path, step, raw_model, args.model, tokenizer, meta={"args": vars(args)})
            print0(f"saved {path}")
        return path

    def nonfinite(what, value):
        where = f"the last good checkpoint is {last_path}" if last_path else "no checkpoint was written in this run"
        return UserError(f"{what} is {value} at step {step}; stopping before the update ({where}). "
                         f"Try lower learning rates ({', '.join('--' + k for k in optimizer_rates(args))})"
                         + ("" if args.grad_clip > 0 else " or --grad_clip 1.0"))

    stop = StopRequest()
    try:
        previous_handler = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        previous_handler = None
    last = lambda s: s == args.num_iterations
    try:
        while True:
            evaluated = bool(history["eval"]) and history["eval"][-1]["step"] == step  # resumed right after an eval
            if (args.eval_every > 0 and step % args.eval_every == 0 or last(step)) and not evaluated:
                raw_model.eval()
                torch.manual_seed(args.seed + 1000 + rank)  # the same noise at every evaluation: comparable curves
                with autocast:
                    val = evaluate_bpb(raw_model, val_batches, token_bytes)
                    val_loss = evaluate_loss(raw_model, val_batches)
                raw_model.train()
                history["eval"].append(dict(step=step, flops=step * total_batch_size * flops_per_token, time=total_time,
                                    val_loss=val_loss, val_bpb=val["bpb"], val_bpb_stderr=val["stderr"]))
                print0(f"step {step:05d} | val loss {val_loss:.4f} | val bpb {val['bpb']:.4f} ± {val['stderr']:.4f}")
                if rank == 0 and all(val["bpb"] < e["val_bpb"] for e in history["eval"][:-1]):  # early stopping's pick
                    os.makedirs(args.checkpoint_dir, exist_ok=True)
                    save_model_file(best_path(args.checkpoint_dir, args.model), step, raw_model, args.model, tokenizer,
                                    meta={"args": vars(args), "val_bpb": val["bpb"]})
                wandb_run.log({"step": step, "val/loss": val_loss, "val/bpb": val["bpb"]})
            if rank == 0 and (args.sample_every > 0 and step > start_step and step % args.sample_every == 0
                              or args.sample_every != 0 and last(step)):
                raw_model.eval()
                with autocast:
                    for text in sample_texts(raw_model, tokenizer, 2, min(64, args.max_seq_len), args.seed):
                        print0(f"sample: {text!r}")
                raw_model.train()
            if step != saved_step and (last(step) or args.save_every > 0 and step % args.save_every == 0 and step > 0):
                last_path, saved_step = save(step), step
            if last(step):
                break

            # one optimisation step over grad_accum micro-batches
            t0 = time.time()
            lrm = lr_multiplier(step, args.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            stats = torch.zeros(2, device=device)  # summed micro-batch losses, stop requests
            for m, loader in enumerate(loaders):
                tokens = next(loader)
                torch.manual_seed(noise_seed(args.seed, step, slots[m]))
                sync = nullcontext() if not ddp or m == grad_accum - 1 else train_model.no_sync()
                with sync:
                    with autocast:
                        loss = train_model(tokens)
                    (loss / grad_accum).backward()
                stats[0] += loss.detach()
            stats[1] = float(stop.time is not None)
            if ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # every rank sees the same loss and stop decision
            loss_sum, stopping = stats.tolist()
            train_loss = loss_sum / (grad_accum * world_size)
            if not math.isfinite(train_loss):
                raise nonfinite("the training loss", train_loss)
            if args.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip).item()
                if not math.isfinite(grad_norm):
                    raise nonfinite("the gradient norm", grad_norm)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                opt.step()
            raw_model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            step += 1
            loader_states = [l.state_dict() for l in loaders]
            if step > start_step + 1:  # the first step includes warm-up / compilation
                total_time += dt
            history["train"].append([step, train_loss])
            smooth_loss = train_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * train_loss
            tok_per_s = total_batch_size / dt
            mfu = 100 * flops_per_token * tok_per_s / peak
            eta = (args.num_iterations - step) * (total_time / max(1, step - start_step - 1) if step > start_step + 1 else dt)
            print0(f"step {step:05d}/{args.num_iterations} | loss {train_loss:.4f} (smooth {smooth_loss:.4f}) | lrm {lrm:.2f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu:.2f}% | eta {format_eta(eta)}")
            wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_s, "train/mfu": mfu})
            if stopping:
                print0(f"interrupted at step {step}: saving a checkpoint (continue with --resume)")
                if step != saved_step:
                    last_path, saved_step = save(step), step
                wandb_run.finish()
                raise KeyboardInterrupt
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    if rank == 0:
        report = write_report(args.checkpoint_dir, args.model, vars(args), raw_model, history, device,
                              samples=sample_texts(raw_model.eval(), tokenizer, 3, min(64, args.max_seq_len), args.seed),
                              tokens_per_second=total_batch_size * (step - start_step - 1) / total_time if total_time else None)
        print0(f"report: {report}")
    wandb_run.finish()
    print0(f"done: {step} steps, {total_time / 60:.2f} min of training, last checkpoint {last_path}")


def training_step(model, tokens, compile=False):
    """A function doing one real training step of model on tokens (forward, backward, clipping, AdamW / Muon
    update at the model's default rates), for timing: scripts.bench and the --minutes budget of scripts.compare."""
    optimizers = setup_optimizers(model)
    forward = torch.compile(model) if compile else model
    autocast = autocast_for(tokens.device)
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
    on a GPU, 2^13 on a CPU), the same at every evaluation."""
    eval_tokens = args.eval_tokens or (2**20 if device.type == "cuda" else 2**13)
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data_dir, rank=rank,
                        world_size=world_size, device=device)
    return list(next_batches(loader, max(1, eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))))


def next_batches(loader, n):
    for _, batch in zip(range(n), loader):
        yield batch


def resume(args, model, optimizers, config, tokenizer, rank, world_size, grad_accum):
    path = find_latest(args.checkpoint_dir, args.model, world_size)
    if path is None:
        raise UserError(f"--resume: no complete {args.model} checkpoint in {args.checkpoint_dir}; start without --resume")
    ckpt = read_checkpoint(path)
    if ckpt["config"] != config.to_dict():
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.to_dict().items() if ckpt["config"].get(k) != v}
        raise UserError(f"{path} was trained with another configuration (checkpoint vs now: {diff}); "
                        f"pass the same flags, or use another --checkpoint_dir")
    if ckpt["tokenizer"]["identity"] != tokenizer.identity:
        raise UserError(f"{path} was trained with another tokenizer than the one in --tokenizer_dir")
    state = torch.load(state_path(path, rank), map_location="cpu", weights_only=True)
    if (state["world_size"], state["grad_accum"]) != (world_size, grad_accum):
        raise UserError(f"{path} was written by {state['world_size']} ranks x {state['grad_accum']} accumulation steps; "
                        f"resume with the same world size and batch settings")
    if ckpt["step"] > args.num_iterations:
        raise UserError(f"{path} is at step {ckpt['step']}, beyond --num_iterations {args.num_iterations}")
    model.load_state_dict(ckpt["model"])
    rates = [[group["initial_lr"] for group in opt.param_groups] for opt in optimizers]
    try:
        for opt, sd in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
    except ValueError as e:  # parameter groups that do not match this model's
        raise UserError(f"the optimiser state of {path} does not fit this version's parameter groups ({e}); "
                        f"resume with the version of the code that wrote it, or start a fresh run") from None
    for opt, group_rates in zip(optimizers, rates):  # a state dict carries its run's rates; this run's flags decide
        for group, rate in zip(opt.param_groups, group_rates):
            group["initial_lr"] = rate
    old_args = ckpt["meta"].get("args", {})
    changed = sorted(k for k, v in vars(args).items() if k in old_args and old_args[k] != v and k not in RESUME_FREE_ARGS)
    if changed:
        print0("note: continuing with settings that differ from the checkpoint's: "
               + ", ".join(f"--{k} {old_args[k]} -> {getattr(args, k)}" for k in changed))
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], state["loaders"], state["history"], state.get("total_time", 0.0)


# flags that do not change what a resumed run computes
RESUME_FREE_ARGS = {"resume", "run", "checkpoint_dir", "data_dir", "tokenizer_dir", "num_shards", "vocab_size", "eval_every",
                    "eval_tokens", "sample_every", "save_every", "device_type", "compile"}
