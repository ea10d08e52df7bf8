"""
The run report: report.md beside the checkpoints with the environment, the configuration, the loss and
bits-per-byte curves (PNG), the final evaluation and a few samples.
"""

import json
import os
import platform
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def plot_curves(history, path, title):
    """Training loss and validation bits per byte against step, side by side."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax1.plot(steps, losses, lw=0.8)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss")
    evals = history["eval"]
    if evals:
        ax2.errorbar([e["step"] for e in evals], [e["val_bpb"] for e in evals],
                     yerr=[e["val_bpb_stderr"] for e in evals], marker="o", capsize=3)
    ax2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(checkpoint_dir, model_type, args, model, history, device, samples, tokens_per_second=None):
    os.makedirs(checkpoint_dir, exist_ok=True)
    png = f"{model_type}_curves.png"
    plot_curves(history, os.path.join(checkpoint_dir, png), f"{model_type}, depth {model.config.depth}")
    final = history["eval"][-1] if history["eval"] else {}
    lines = [
        f"# {model_type} training report",
        "",
        "## Environment",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, python {platform.python_version()}, git commit {git_commit()}",
        "",
        "## Configuration",
        "```json",
        json.dumps({"model": model.config.to_dict(), "args": args}, indent=2, default=str),
        "```",
        f"{model.num_params():,} parameters, {model.flops_per_token():.3e} training FLOPs per token",
        "",
        "## Curves",
        f"![curves]({png})",
        "",
        "## Final evaluation",
        "| step | val loss | val bits per byte | training tokens/s |",
        "|---|---|---|---|",
        f"| {final.get('step', '-')} | {final.get('val_loss', float('nan')):.4f} | "
        f"{final.get('val_bpb', float('nan')):.4f} ± {final.get('val_bpb_stderr', float('nan')):.4f} | "
        f"{tokens_per_second or float('nan'):,.0f} |",
        "",
        "## Samples",
        *[f"{i + 1}. `{s!r}`" for i, s in enumerate(samples)],
        "",
    ]
    path = os.path.join(checkpoint_dir, "report.md" if model_type == "diffusion" else f"report_{model_type}.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path
