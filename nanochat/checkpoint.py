"""
Checkpoints: plain tensors, numbers and strings only, so that they load with torch.load(weights_only=True).

    {checkpoint_dir}/{model_type}_step_{step:06d}.pt              weights, config, tokenizer, step, metadata
    {checkpoint_dir}/{model_type}_step_{step:06d}.state_rank{r}.pt  optimizer + dataloader state of rank r
    {checkpoint_dir}/{model_type}_best.pt                          weights at the lowest validation bpb so far

The tokenizer travels inside the checkpoint (its ranks as text), so a checkpoint is self-contained. FORMAT names
the layout; this code reads its own format only, and says so to the owner of a file from another version.
Every file is written to a temporary name and renamed; the model file is written last, so a checkpoint
whose model file exists is complete.
"""

import glob
import os
import re

import torch

from nanochat.common import UserError
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
    tmp = os.fspath(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def read_checkpoint(path):
    """The checkpoint dict, or one clear UserError for a missing, corrupt or incompatible file."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one with: python -m scripts.diffusion_train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or (refused) pickled objects
        raise UserError(f"{path} is not a readable checkpoint (truncated, or not a checkpoint file): {type(e).__name__}") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if isinstance(found, str) and found.startswith("nanochat-diffusion/") and found != FORMAT:
        raise UserError(f"{path} was written by another version of this code (format {found!r}; this one reads "
                        f"{FORMAT!r}): retrain it with this version, or use the version of the code that wrote it")
    if found != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} checkpoint (found format {found!r}); it comes from another tool")
    if ckpt.get("model_type") not in MODEL_TYPES:
        raise UserError(f"{path} holds an unknown model type {ckpt.get('model_type')!r}")
    return ckpt


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


def find_latest(checkpoint_dir, model_type, world_size):
    """Path of the newest complete checkpoint (model file and a state file per rank), or None."""
    pattern = re.compile(rf"{model_type}_step_(\d{{6}})\.pt$")
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, f"{model_type}_step_*.pt")):
        m = pattern.search(os.path.basename(path))
        if m and all(os.path.isfile(state_path(path, r)) for r in range(world_size)):
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None
