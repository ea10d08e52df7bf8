"""
Checkpoints: plain tensors, numbers and strings only, so that they load with torch.load(weights_only=True).

    {checkpoint_dir}/{model_type}_step_{step:06d}.pt              weights, config, tokenizer, step, metadata
    {checkpoint_dir}/{model_type}_step_{step:06d}.state_rank{r}.pt  optimizer + dataloader state of rank r
    {checkpoint_dir}/{model_type}_best.pt                          weights at the lowest validation bpb so far

The tokenizer travels inside the checkpoint (its ranks as text), so a checkpoint is self-contained. FORMAT names
the layout; this code reads its own format only, and says so to the owner of a file from another version.
Every file is written to a temporary name and renamed; the model file is written last, so a checkpoint
whose model file exists is complete. The model file's meta, its state files and the best file carry the run's
identity (run_id), so that files of two runs are never taken for one checkpoint.
"""

import glob
import os
import re
import shutil

import torch

from nanochat.common import UserError, format_bytes
from nanochat.diffusion_roberta import DiffusionConfig, DiffusionRoBERTa
from nanochat.gpt import GPT, GPTConfig
from nanochat.masked_diffusion import MaskedDiffusion, MaskedDiffusionConfig
from nanochat.tokenizer import Tokenizer

FORMAT = "nanochat-diffusion/2"
MODEL_TYPES = {"diffusion": (DiffusionConfig, DiffusionRoBERTa), "gpt": (GPTConfig, GPT),  # where models are built
               "masked": (MaskedDiffusionConfig, MaskedDiffusion)}


def checkpoint_path(checkpoint_dir, model_type, step):
    return os.path.join(checkpoint_dir, f"{model_type}_step_{step:06d}.pt")


def best_path(checkpoint_dir, model_type):
    return os.path.join(checkpoint_dir, f"{model_type}_best.pt")


def state_path(path, rank):
    return path[: -len(".pt")] + f".state_rank{rank}.pt"


def save_atomic(obj, path):
    """torch.save under a temporary name, then a rename: a file under its final name is always complete. A failed
    write (a full disk, a vanished folder) removes the temporary file and is one UserError that says how much space
    the file needed and how much was free."""
    tmp = os.fspath(path) + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = format_bytes(shutil.disk_usage(folder).free)
        except OSError:
            free = "an unknown amount"
        raise UserError(f"could not write {path} ({reason}); it needs about {format_bytes(tensor_bytes(obj))} and "
                        f"{free} is free in {folder}") from None


def tensor_bytes(obj):
    """Bytes of the tensors in a (nested) dict / list: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def build_model(model_type, config_dict):
    config_cls, model_cls = MODEL_TYPES[model_type]
    return model_cls(config_cls.from_dict(config_dict))


def save_model_file(path, step, model, model_type, tokenizer, meta=None):
    save_atomic({
        "format": FORMAT,
        "model_type": model_type,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer.to_dict(),
        "step": step,
        "meta": meta or {},
    }, path)


def load_file(path, what, hint=""):
    """torch.load of plain tensors and values (nothing is unpickled), or one UserError for a missing or damaged file."""
    if not os.path.isfile(path):
        raise UserError(f"no {what} at {path}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or (refused) pickled objects
        raise UserError(f"{path} is not a readable {what} (truncated, or not a checkpoint file): {type(e).__name__}") from None


def read_checkpoint(path):
    """The checkpoint dict, or one clear UserError for a missing, corrupt or incompatible file."""
    ckpt = load_file(path, "checkpoint", "; train one with: python -m scripts.diffusion_train")
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if isinstance(found, str) and found.startswith("nanochat-diffusion/") and found != FORMAT:
        raise UserError(f"{path} was written by another version of this code (format {found!r}; this one reads "
                        f"{FORMAT!r}): retrain it with this version, or use the version of the code that wrote it")
    if found != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} checkpoint (found format {found!r}); it comes from another tool")
    if ckpt.get("model_type") not in MODEL_TYPES:
        raise UserError(f"{path} holds an unknown model type {ckpt.get('model_type')!r}")
    return ckpt


STATE_KEYS = ("optimizers", "loaders", "world_size", "grad_accum", "history")


def read_state(path):
    """A state file's dict, or one clear UserError for a missing, damaged or foreign file (nothing is unpickled)."""
    state = load_file(path, "state file")
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise UserError(f"{path} is not a state file of this code (it lacks {', '.join(missing)})")
    return state


def load_model(path, device="cpu", expect=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a model file."""
    ckpt = read_checkpoint(path)
    if expect is not None and ckpt["model_type"] != expect:
        raise UserError(f"{path} is a {ckpt['model_type']} checkpoint; this script needs a {expect} checkpoint")
    try:
        model = build_model(ckpt["model_type"], ckpt["config"])
        model.load_state_dict(ckpt["model"])
        tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of the code: {e}") from None
    return model.to(device).eval(), tokenizer, ckpt


def checkpoint_steps(checkpoint_dir, model_type):
    """The steps of which checkpoint_dir holds a model file or a state file, complete or not."""
    pattern = re.compile(rf"{model_type}_step_(\d{{6,}})(\.state_rank\d+)?\.pt$")
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    return {int(m.group(1)) for m in map(pattern.fullmatch, names) if m}


def complete_checkpoints(checkpoint_dir, model_type, world_size):
    """Paths of the complete checkpoints (model file and a state file per rank), newest first."""
    paths = [checkpoint_path(checkpoint_dir, model_type, s) for s in sorted(checkpoint_steps(checkpoint_dir, model_type), reverse=True)]
    return [p for p in paths if all(os.path.isfile(f) for f in [p] + [state_path(p, r) for r in range(world_size)])]


def find_latest(checkpoint_dir, model_type, world_size):
    """Path of the newest complete checkpoint, or None."""
    return next(iter(complete_checkpoints(checkpoint_dir, model_type, world_size)), None)


def run_files(checkpoint_dir, model_type):
    """Every file of model_type's checkpoints in checkpoint_dir (steps, state files, the best file, leftover .tmp)."""
    names = (f"{model_type}_step_*.pt", f"{model_type}_step_*.pt.tmp", f"{model_type}_best.pt", f"{model_type}_best.pt.tmp")
    return sorted(f for name in names for f in glob.glob(os.path.join(glob.escape(checkpoint_dir), name)))


def remove_checkpoint(path):
    """Delete a step checkpoint: the model file first (what is left is incomplete, never taken for a checkpoint),
    then every rank's state file."""
    for f in [path] + sorted(glob.glob(glob.escape(path[: -len(".pt")]) + ".state_rank*.pt")):
        if os.path.exists(f):
            os.remove(f)


def remove_old_checkpoints(checkpoint_dir, model_type, keep_last, newest_step):
    """After a save at newest_step: delete the step checkpoints up to it beyond the keep_last newest (0 = keep all).
    Later steps, left by a damaged checkpoint that --resume passed over, are rewritten when the run gets there;
    {model_type}_best.pt is always kept."""
    if keep_last == 0:
        return
    steps = sorted((s for s in checkpoint_steps(checkpoint_dir, model_type) if s <= newest_step), reverse=True)
    for step in steps[keep_last:]:
        remove_checkpoint(checkpoint_path(checkpoint_dir, model_type, step))
