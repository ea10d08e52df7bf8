"""The parts of the CUDA path that a CPU can run: torch.compile (inductor) of the training step and of the denoising
step, without graph breaks, matching eager; bf16 autocast (torch.autocast on the CPU, the code path the GPU uses)
for training, the bound and sampling, with the schedule arithmetic in float64."""
import pytest
import torch
import torch._dynamo
import torch._inductor.config

from nanochat.common import autocast_for
from nanochat.diffusion_roberta import DiffusionConfig, DiffusionRoBERTa
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers

MODELS = {
    "diffusion": lambda: DiffusionRoBERTa(DiffusionConfig(vocab_size=128, depth=1, max_seq_len=16, embed_dim=8)),
    "gpt": lambda: GPT(GPTConfig(vocab_size=128, depth=1, max_seq_len=16)),
}


def train_losses(build, steps, compile=False, dtype=None):
    torch.manual_seed(0)
    model = build()
    optimizers = setup_optimizers(model)
    forward = torch.compile(model) if compile else model
    tokens = torch.randint(0, 128, (4, 16))
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the trainer's per-step noise seed
        with autocast_for("cpu", dtype):
            loss = forward(tokens)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", MODELS)
def test_training_step_compiles_without_graph_breaks_and_matches_eager(name):
    model = MODELS[name]()
    explanation = torch._dynamo.explain(model)(torch.randint(0, 128, (4, 16)))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    # inductor draws its own random numbers unless told to use eager's: with them, compiled == eager (torch's own
    # config.patch: pytest's monkeypatch does not see the config module's attributes in every version)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        assert train_losses(MODELS[name], 2, compile=True) == pytest.approx(train_losses(MODELS[name], 2), rel=1e-4)


def test_denoising_step_compiles_without_graph_breaks_and_samples_as_eager():
    torch.manual_seed(0)
    model = MODELS["diffusion"]().eval()
    z = torch.randn(2, 16, 8)
    known = torch.zeros(2, 16, dtype=torch.bool)
    level = model.noise_level(torch.ones(2, dtype=torch.float64))
    explanation = torch._dynamo.explain(model.predict_x0)(z, level, known, torch.zeros_like(z))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    sample = lambda **kw: model.generate(2, 16, {0: 1}, generator=torch.Generator().manual_seed(3), num_steps=4,
                                         sampler="ddim", **kw)
    assert torch.equal(sample(compile=True), sample())


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_on_the_cpu_trains_close_to_float32(name):
    fp32, bf16 = train_losses(MODELS[name], 3), train_losses(MODELS[name], 3, dtype="bfloat16")
    assert bf16[0] == pytest.approx(fp32[0], rel=0.01) and bf16 != fp32, (bf16, fp32)  # bf16 matmuls, the same loss
    assert bf16 == pytest.approx(fp32, rel=0.1), (bf16, fp32)  # and the runs stay close (Muon amplifies rounding)


def test_bf16_bound_and_sampling_keep_the_schedule_in_float64():
    torch.manual_seed(0)
    model = MODELS["diffusion"]().eval()
    tokens = torch.randint(0, 128, (4, 16))
    torch.manual_seed(1)
    fp32 = model.nll_bound(tokens, num_t=4).mean().item()
    with autocast_for("cpu", "bfloat16"):
        level = model.noise_level(*model.schedule.gamma_and_slope(torch.rand(4, dtype=torch.float64)))
        torch.manual_seed(1)
        bf16 = model.nll_bound(tokens, num_t=4).mean().item()
        ids = model.generate(2, 16, {0: 1}, num_steps=3)
    assert model.schedule.gamma(torch.tensor([0.5])).dtype == torch.float64 and level.alpha.dtype == torch.float32
    assert bf16 == pytest.approx(fp32, rel=0.02) and ids.shape == (2, 16) and ids[:, 0].eq(1).all()


class CountScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (.item(), .tolist(), bool(tensor): a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_no_host_reads_in_the_denoising_step_or_the_training_step():
    """A denoising step reads nothing back; a training forward + backward reads one number, the self-conditioning
    coin, drawn from a CPU tensor (no device sync). The schedule tables are built once per generate() call."""
    torch.manual_seed(0)
    model = MODELS["diffusion"]()
    tokens = torch.randint(0, 128, (4, 16))
    with CountScalarReads() as train_reads:
        model(tokens).backward()
    model.eval()
    z = torch.randn(2, 16, 8)
    known = torch.zeros(2, 16, dtype=torch.bool)
    level = model.noise_level(torch.linspace(1, 0, 9, dtype=torch.float64))  # a whole table, moved once
    with torch.no_grad(), CountScalarReads() as step_reads:
        model.predict_x0(z, level.at(3), known, torch.zeros_like(z))
    assert (train_reads.reads, step_reads.reads) == (1, 0)
