"""
A tour of embedding-space diffusion in four steps, offline, in well under a minute on a laptop CPU:

    1. the noise schedules (cosine / linear / sqrt): alpha-bar, SNR and noise level over t, as a PNG and in ASCII
    2. forward diffusion: a sentence's embeddings noised at increasing t, shown as their nearest tokens
    3. one training step on a small model (loss before and after, same noise), then a few seconds more
       training on a built-in paragraph so that step 4 has something to say
    4. reverse diffusion: a sample emerging from noise, printed every few denoising steps

    python -m scripts.diffusion_demo                                   # a fresh small model
    python -m scripts.diffusion_demo --checkpoint checkpoints/diffusion_step_005000.pt   # real text in step 4
    python -m scripts.diffusion_demo --checkpoint FILE --label news --guidance 2   # a model trained with --label_column

Tokenizer: the checkpoint's; else the default one ($NANOCHAT_BASE_DIR/tokenizer) if it exists; else a tiny
byte-level BPE (vocab 300) trained on the built-in paragraph, in-process.
"""

import argparse
import copy
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nanochat.checkpoint import load_model  # noqa: E402
from nanochat.common import UserError, check_seed, check_writable, compute_init, get_base_dir, run_main  # noqa: E402
from nanochat.diffusion_roberta import (  # noqa: E402
    SCHEDULES, DiffusionConfig, DiffusionRoBERTa, NoiseSchedule, alpha_bar, alpha_sigma,
)
from nanochat.optim import setup_optimizers  # noqa: E402
from nanochat.sampling import sampler_settings  # noqa: E402
from nanochat.tokenizer import Tokenizer, get_tokenizer  # noqa: E402

PARAGRAPH = (
    "A diffusion model learns to undo noise. During training we take a clean sentence, turn every word into "
    "a vector, and add Gaussian noise of a random strength. The network sees the noisy vectors and the noise "
    "level, and guesses the words that were there. To write something new, we start from pure noise and ask "
    "the network for its best guess, add back a little less noise, and ask again. Step by step the noise "
    "fades, and the words come into focus. Unlike a left to right language model, every position is refined "
    "at once, and each word can look at the words after it as well as before it. "
)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", default=None, help="a trained diffusion model file (default: a fresh small model)")
    a("--out_dir", default=None, help="where the schedule plot diffusion_demo_schedule.png goes (default: $NANOCHAT_BASE_DIR/demo)")
    a("--train_steps", type=int, default=200, help="extra training steps on the paragraph without --checkpoint (at most)")
    a("--train_seconds", type=float, default=15.0, help="time limit for those steps")
    a("--num_steps", type=int, default=None, help="denoising steps in step 4 (default: 50, or a distilled checkpoint's own)")
    a("--label", default=None, help="step 4 conditioned on this label (a checkpoint trained with --label_column)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance weight w >= 0 in step 4 (0 = none)")
    a("--seed", type=int, default=0)
    a("--device_type", default="cpu", help="cuda | mps | cpu (empty = autodetect)")
    return p.parse_args(argv)


def check_args(args):
    if args.num_steps is not None and args.num_steps < 1:
        raise UserError(f"--num_steps must be >= 1, got {args.num_steps}")
    if args.train_steps < 0 or not 0 <= args.train_seconds < float("inf"):
        raise UserError("--train_steps and --train_seconds must be >= 0 (and finite)")
    check_seed(args.seed)
    check_writable(args.out_dir, "--out_dir")


def header(title):
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


def show(tokenizer, ids, width=96):
    """One line of text for a row of token ids (newlines as ⏎, BOS as |)."""
    bos = tokenizer.get_bos_token_id()
    text = "".join("|" if i == bos else tokenizer.decode([i]) for i in ids).replace("\n", "⏎")
    return text if len(text) <= width else text[:width - 1] + "…"


def ascii_plot(curves, width=64, height=16):
    """Curves {label char: values in [0, 1]} on one character grid, y from 1 (top) to 0."""
    grid = [[" "] * width for _ in range(height)]
    for char, ys in curves.items():
        for col in range(width):
            y = ys[round(col * (len(ys) - 1) / (width - 1))]
            row = height - 1 - round(float(y) * (height - 1))
            grid[row][col] = char if grid[row][col] in (" ", char) else "*"
    lines = [f"{1 - r / (height - 1):4.2f} |{''.join(g)}" for r, g in enumerate(grid)]
    return "\n".join(lines + ["     +" + "-" * width, "      t=0" + " " * (width - 8) + "t=1"])


# -----------------------------------------------------------------------------
# the four steps

def step1_schedules(out_dir, config):
    header("1. Noise schedules: z_t = sqrt(alpha_bar) x + sqrt(1 - alpha_bar) eps")
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    ab = {name: alpha_bar(name, t) for name in SCHEDULES}
    print("   t    " + "".join(f"{name:>24}" for name in SCHEDULES))
    print("        " + "".join(f"{'alpha_bar   log10 SNR':>24}" for _ in SCHEDULES))
    for tt in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        i = round(tt * 200)
        print(f"  {tt:4.2f}  " + "".join(f"{ab[n][i]:>12.4f}{torch.log10(ab[n][i] / (1 - ab[n][i])):>12.2f}" for n in SCHEDULES))
    print("\nalpha_bar over t (c = cosine, l = linear, s = sqrt, * = overlap):")
    print(ascii_plot({name[0]: ab[name] for name in SCHEDULES}))
    print(f"\nThe model uses these shapes truncated to gamma = -log SNR in [{config.gamma_min}, {config.gamma_max}] "
          f"(alpha_bar from {torch.sigmoid(torch.tensor(-config.gamma_min)):.3f} down to {torch.sigmoid(torch.tensor(-config.gamma_max)):.4f}).")

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for name in SCHEDULES:
        axes[0].plot(t, ab[name], label=name)
        axes[1].plot(t, torch.log10(ab[name] / (1 - ab[name])), label=name)
        axes[2].plot(t, (1 - ab[name]).sqrt(), label=name)
        gamma = NoiseSchedule(name, config.gamma_min, config.gamma_max).gamma(t)
        axes[3].plot(t, -gamma, label=name)
    titles = ["alpha_bar (signal)", "log10 SNR", "noise level sqrt(1 - alpha_bar)", "log SNR as the model uses it (truncated)"]
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="t")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, "diffusion_demo_schedule.png"))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot saved to {path}")


@torch.no_grad()
def step2_forward(model, tokenizer, sentence, device, seed):
    header("2. Forward diffusion: the sentence's embeddings noised at increasing t, read back as nearest tokens")
    ids = torch.tensor([tokenizer.encode(sentence)], device=device)
    E = model.embed_matrix()
    x = E[ids]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device)  # one noise draw for all t
    print(f"  t     log SNR  tokens kept  nearest tokens")
    for t in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        gamma = model.schedule.gamma(torch.tensor([t]))
        alpha, sigma = (v.item() for v in alpha_sigma(gamma))
        nearest = ((alpha * x + sigma * eps) @ E.t()).argmax(-1)  # embeddings share a norm: max dot = nearest
        kept = (nearest == ids).float().mean().item()
        print(f"  {t:3.1f}  {-gamma.item():+7.2f}  {kept:10.0%}   {show(tokenizer, nearest[0].tolist(), 80)}")


def training_batch(tokenizer, seq_len, device):
    """Overlapping windows of the paragraph (repeated, with BOS between copies) as a (B, seq_len) batch."""
    ids = tokenizer.encode([PARAGRAPH] * 4, prepend_bos=True)
    ids = [i for row in ids for i in row]
    stride = max(1, seq_len // 4)
    rows = [ids[s:s + seq_len] for s in range(0, len(ids) - seq_len + 1, stride)][:16]
    return torch.tensor(rows, device=device)


def step3_train(model, tokenizer, device, args, fresh):
    header("3. Training: one optimisation step on a small batch (loss with the same noise before and after)")
    model = model if fresh else copy.deepcopy(model)  # a checkpoint's model is not changed for step 4
    model.train()
    batch = training_batch(tokenizer, min(64, model.config.max_seq_len), device)
    optimizers = setup_optimizers(model)

    def loss_with_fixed_noise():
        torch.manual_seed(args.seed)
        return model(batch)

    loss = loss_with_fixed_noise()
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = loss_with_fixed_noise().item()
    print(f"batch {tuple(batch.shape)} | loss before {loss.item():.4f} -> after one step {after:.4f}")
    if not fresh or args.train_steps == 0:
        return
    print(f"\ntraining the fresh model on the paragraph: up to {args.train_steps} steps / {args.train_seconds:.0f} s")
    t0, step = time.time(), 0
    for step in range(1, args.train_steps + 1):
        loss = model(batch)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if step % 25 == 0:
            print(f"  step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
        if time.time() - t0 > args.train_seconds:
            break
    print(f"  stopped after {step} steps, loss {loss.item():.4f}, {time.time() - t0:.1f}s "
          f"(seconds of training on one paragraph give word fragments at best; --checkpoint shows a trained model)")


@torch.no_grad()
def step4_reverse(model, tokenizer, device, args):
    num_steps = args.num_steps
    condition = (f", label {args.label!r}" if args.label else "") + (f", guidance {args.guidance:g}" if args.guidance else "")
    header(f"4. Reverse diffusion: from pure noise to text in {num_steps} denoising steps (argmax of each x0 "
           f"estimate){condition}")
    model.eval()
    seq_len = min(64, model.config.max_seq_len)
    g = torch.Generator(device=device).manual_seed(args.seed)
    tokens, trajectory = model.generate(1, seq_len, {0: tokenizer.get_bos_token_id()}, generator=g, return_trajectory=True,
                                        num_steps=num_steps, label=args.label, guidance=args.guidance)
    every = max(1, len(trajectory) // 10)  # block diffusion: num_steps per block
    for i, step_tokens in enumerate(trajectory):
        if (i + 1) % every == 0 or i == 0 or i == len(trajectory) - 1:
            print(f"  step {i + 1:4d}/{len(trajectory)}  {show(tokenizer, step_tokens[0].tolist(), 88)}")
    print(f"\nfinal sample:\n{tokenizer.decode(tokens[0, 1:].tolist())}")


def demo_tokenizer():
    try:
        tokenizer = get_tokenizer()
        print(f"tokenizer: the default one (vocab {tokenizer.get_vocab_size():,})")
    except UserError:
        tokenizer = Tokenizer.train_from_iterator(iter([PARAGRAPH] * 3), 300)
        print("tokenizer: none trained yet, so a tiny byte-level BPE (vocab 300) trained on the demo paragraph")
    return tokenizer


def main(argv=None):
    args = get_args(argv)
    args.out_dir = args.out_dir or os.path.join(get_base_dir(), "demo")
    check_args(args)
    t_start = time.time()
    _, _, _, _, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model, tokenizer, ckpt = load_model(args.checkpoint, device, expect="diffusion")
        print(f"model: {args.checkpoint} (step {ckpt['step']}, {model.num_params():,} parameters)")
    else:
        tokenizer = demo_tokenizer()
        config = DiffusionConfig(vocab_size=tokenizer.get_vocab_size(), depth=1, max_seq_len=64, embed_dim=32)
        model = DiffusionRoBERTa(config).to(device)
        print(f"model: a fresh DiffusionRoBERTa, depth 1, {model.num_params():,} parameters")
    args.num_steps = args.num_steps or model.config.distilled_steps or 50  # a distilled checkpoint's own by default
    sampler_settings(model, 1.0, dict(num_steps=args.num_steps, label=args.label, guidance=args.guidance))  # step 4's
    step1_schedules(args.out_dir, model.config)
    step2_forward(model, tokenizer, PARAGRAPH.split(". ")[0] + ".", device, args.seed)
    step3_train(model, tokenizer, device, args, fresh=args.checkpoint is None)
    step4_reverse(model, tokenizer, device, args)
    print(f"\ndemo done in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    run_main(main)
