"""
Common utilities: errors, base dir, device/distributed setup, logging, flops.
"""

import os
import sys
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix (bad path, missing file, ...). The message says what and how."""


def run_main(main):
    """Entry point wrapper for scripts: user errors become one clean line on stderr."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def get_base_dir():
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def compute_init(device_type=""):
    """Set up device and (under torchrun) the process group. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown --device_type {device_type!r}; use cuda, mps or cpu (or leave empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device_type cuda requested but CUDA is not available; use --device_type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device_type mps requested but MPS is not available; use --device_type cpu")
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
    else:
        device = torch.device(device_type)
        if ddp and not dist.is_initialized():
            dist.init_process_group(backend="gloo")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DummyWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run, rank, config, project="nanochat-diffusion"):
    """Real wandb only on rank 0 and when run != 'dummy'. Honors WANDB_MODE=offline."""
    if run == "dummy" or rank != 0:
        return DummyWandb()
    import wandb
    return wandb.init(project=project, name=run, config=config)


# bf16 dense peak FLOP/s, matched by substring of torch.cuda.get_device_name() (first match wins)
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device):
    """Peak FLOP/s for MFU: table lookup on cuda, a quick float32 matmul measurement on cpu/mps."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
        print0(f"note: unknown GPU {name!r}, assuming A100 peak 312e12 FLOP/s for MFU")
        return 312e12
    n, reps = 2048, 5  # best of several: a busy machine only ever makes a matmul slower
    sync = torch.mps.synchronize if device.type == "mps" else (lambda: None)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warmup
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
