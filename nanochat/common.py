"""
Common utilities: errors, base dir, config flags, device/distributed setup, timing, logging, flops, formatting.
"""

import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, fields

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


def check_writable(path, flag, kind="folder"):
    """One UserError naming the flag unless path can be written: a folder (kind="folder") or a file (kind="file"),
    created later if missing. Run before any work, so that no run fails at its first save; creates nothing."""
    path = os.path.abspath(path)
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give the name of a file")
    existing = path if kind == "folder" else os.path.dirname(path)
    while not os.path.exists(existing):  # the folders that do not exist yet will be created in the nearest one that does
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK) or (os.path.isfile(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} is not writable (no permission, or a read-only file system); choose another path")


def check_seed(seed, flag="--seed"):
    """Seeds go to torch.manual_seed, which takes 64 bits (the training loop adds small offsets)."""
    if not 0 <= seed < 2**63:
        raise UserError(f"{flag} must be an integer in 0..2**63-1, got {seed}")


def write_text_atomic(path, text, flag="--output"):
    """text to path through a temporary file and a rename: never a half-written file; one UserError if it fails."""
    tmp = os.fspath(path) + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {flag} {path}: {e.strerror}") from None


def format_bytes(n):
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def device_memory(device):
    """Bytes of memory of a device: the GPU's own for CUDA, the machine's RAM otherwise (MPS shares it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise ValueError(s)


parse_bool.__name__ = "0/1"  # argparse names the type in its error message


def add_config_args(parser, config_cls, skip=()):
    """One flag --name per knob of a config dataclass (its type, default and help; a field declared without knob(),
    such as the label set that the data decides, is no flag); the config's __post_init__ validates the values."""
    group = parser.add_argument_group(f"model ({config_cls.__name__})")
    for f in fields(config_cls):
        if f.name not in skip and "help" in f.metadata:
            default = f.default if f.default is not MISSING else None
            group.add_argument(f"--{f.name}", type=parse_bool if f.type in (bool, "bool") else type(default),
                               default=default, help=f"{f.metadata.get('help', '')} (default: {default})")


def config_from_args(config_cls, args, **values):
    """The config whose fields are args' flags of the same name, updated by values."""
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)} | values)


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


DTYPES = ("float32", "bfloat16")


def autocast_for(device, dtype=None):
    """The autocast context for a --dtype flag: bfloat16 (the default on CUDA) autocasts the matmuls to bf16 on
    any device (the CUDA path runs on the CPU too); float32 (the default elsewhere) runs without autocast."""
    device = torch.device(device)
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def sync(device):
    """Wait for the device's queued work (for timing)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_times(fns, reps, warmup, device):
    """Median seconds of each named function, called in turn (ABCABC...) after `warmup` untimed rounds, so that a
    noisy machine slows them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def finite(x):
    """NaN / inf -> None, so that the JSON is standard."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


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
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warmup
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
