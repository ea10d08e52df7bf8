"""The masked diffusion model (MDLM): the [MASK] input and SUBS output, the bound on data of known entropy, the ancestral
sampler (prompt and infill kept, its unmasking rate, its cache), and the interface the scripts use."""
import math

import pytest
import torch

from nanochat.masked_diffusion import MaskedDiffusion, MaskedDiffusionConfig
from tests.test_model import randomize


def tiny_model(**kw):
    return MaskedDiffusion(MaskedDiffusionConfig(**{**dict(depth=1, vocab_size=32, max_seq_len=16), **kw}))


def count_calls(model):
    """model.logits, recording its inputs in the returned list."""
    inputs, logits = [], model.logits
    model.logits = lambda z: (inputs.append(z.clone()), logits(z))[1]
    return inputs


def test_mask_token_in_the_input_none_in_the_output_and_attention_both_ways():
    model = randomize(tiny_model()).eval()
    assert model.mask_id == 32 and model.wte.weight.shape[0] == 33 and model.lm_head.out_features == 32
    z = torch.randint(0, 32, (1, 16))
    z[0, 3:9] = model.mask_id
    changed = z.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    assert model.logits(z).shape == (1, 16, 32)
    assert not torch.allclose(model.logits(z)[0, 0], model.logits(changed)[0, 0]), "the first position must see the last"


def test_known_positions_are_never_masked_and_unmasked_ones_cost_nothing():
    model = randomize(tiny_model())
    inputs = count_calls(model)
    tokens = torch.randint(0, 32, (2, 16))
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[:, :5] = True
    ce = model.masked_ce(tokens, torch.ones(2, dtype=torch.float64), known)  # t = 1: everything else masked
    assert torch.equal(inputs[0][:, :5], tokens[:, :5]) and (inputs[0][:, 5:] == model.mask_id).all()
    assert (ce[:, :5] == 0).all() and (ce[:, 5:] > 0).all()
    assert (model.masked_ce(tokens, torch.full((2,), 1e-9, dtype=torch.float64), known) == 0).all()  # nothing masked


def test_bound_and_loss_of_a_uniform_predictor_are_log_vocab():
    """The untrained model (zero head) predicts every token with probability 1 / V at every masked position: the
    1 / t weighting must make both the training loss and the bound log V per token, whatever the data."""
    torch.manual_seed(0)
    model = tiny_model(bound_samples=32).eval()
    tokens = torch.randint(0, 32, (1024, 16))
    nats, targets = model.token_nll(tokens)
    assert nats.mean().item() == pytest.approx(math.log(32), rel=0.015) and torch.equal(targets, tokens)
    losses = [model(tokens).item() for _ in range(10)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(32), rel=0.025)


def train(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(batch(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_bound_on_data_of_known_entropy():
    """I.i.d. uniform tokens over k of the V symbols have entropy log k nats per token: a valid bound never goes
    meaningfully below it, and after training it comes close to it."""
    torch.manual_seed(0)
    k = 8
    model = tiny_model(vocab_size=16, cond_rate=0.0)
    batch = lambda n: torch.randint(0, k, (n, 16))
    bound = lambda: model.eval().token_nll(batch(512))[0].mean().item()
    before = bound()
    train(model.train(), batch, 250)
    after = bound()
    assert before > after >= math.log(k) - 0.03, (before, after, math.log(k))
    assert after < 1.10 * math.log(k), (after, math.log(k))


def test_bound_on_rows_that_one_token_determines():
    """Rows of consecutive ids (w, w+1, ...): log k nats per row, log k / T per token. The model learns to read the
    unmasked tokens: its bound falls far below the unigram entropy log k, never below the true one."""
    torch.manual_seed(0)
    k, T = 32, 16
    model = tiny_model(depth=2, cond_rate=0.0)
    rows = lambda n: (torch.randint(0, k, (n, 1)) + torch.arange(T)) % k
    bound = train(model, rows, 300).token_nll(rows(256))[0].mean().item()
    assert math.log(k) / T - 0.02 < bound < 0.25 * math.log(k), (bound, math.log(k) / T)


def test_generate_keeps_prompt_and_infill_and_follows_its_seed():
    model = randomize(tiny_model()).eval()
    known = {0: 5, 1: 6, 2: 7, 10: 3, 15: 31}
    steps = []

    def run(seed, **kw):
        return model.generate(3, 16, known, generator=torch.Generator().manual_seed(seed), **kw)

    a = run(0, num_steps=8, callback=lambda: steps.append(1))
    assert a.shape == (3, 16) and a.dtype == torch.long and a.max() < 32, "no [MASK] left"
    assert all((a[:, p] == w).all() for p, w in known.items())
    assert len(steps) == 8 == model.progress_steps(16, known, model.sampler_settings(num_steps=8))
    assert torch.equal(a, run(0, num_steps=8)) and not torch.equal(a, run(1, num_steps=8))
    for n in (1, 3, 40):  # any number of steps, fewer or more than the positions to fill
        out = run(0, num_steps=n, temperature=0.7)
        assert out.max() < 32 and all((out[:, p] == w).all() for p, w in known.items())
    assert model.describe_sampler(model.sampler_settings()) == "128 ancestral unmasking steps"


def test_sampler_unmasks_at_the_ancestral_rate():
    """From t = 1 - i/n to t - 1/n a mask is revealed with probability (t - s) / t: the share of masks left before
    step i is t = 1 - i/n."""
    model = randomize(tiny_model()).eval()
    inputs = count_calls(model)
    model.generate(400, 16, {}, generator=torch.Generator().manual_seed(0), cache=False, num_steps=4)
    left = [(z == model.mask_id).float().mean().item() for z in inputs]
    assert left == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=0.01)


def test_cache_gives_the_samples_of_no_cache_with_fewer_network_calls():
    """A step that unmasks nothing leaves z unchanged: its successor reuses the logits (MDLM's cache)."""
    model = randomize(tiny_model()).eval()
    known = {0: 1, 7: 2}
    runs = {}
    for cache in (True, False):
        inputs = count_calls(model)
        ids = model.generate(2, 16, known, generator=torch.Generator().manual_seed(0), cache=cache, num_steps=64)
        runs[cache] = ids, inputs
        del model.logits
    (cached, cached_inputs), (uncached, uncached_inputs) = runs[True], runs[False]
    assert torch.equal(cached, uncached)
    assert len(uncached_inputs) == 64 and len(cached_inputs) <= 2 * (16 - len(known))  # a call only after a step unmasked
    distinct = [z for i, z in enumerate(uncached_inputs) if i == 0 or not torch.equal(z, uncached_inputs[i - 1])]
    assert len(cached_inputs) == len(distinct) and all(torch.equal(a, b) for a, b in zip(cached_inputs, distinct))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(sampler="ddpm"), "no sampler option sampler"),
    (dict(known={3: 32}), "vocab_size"),  # [MASK] is not a token to keep
    (dict(seq_len=17), "seq_len"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(**(dict(num_samples=1, seq_len=16, num_steps=2) | kwargs))


def test_flops_param_groups_and_config():
    model = tiny_model(depth=2)
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("blocks.", "lm_head.")))
    assert model.matmul_params() == n and model.flops_per_token(16) == 6 * n + 12 * 2 * 128 * 16
    groups = model.param_groups()
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and groups["head"] == [model.lm_head.weight]
    config = MaskedDiffusionConfig(depth=1, vocab_size=32, cond_rate=0.5)
    assert MaskedDiffusionConfig.from_dict(config.to_dict()) == config
    for bad in (dict(cond_rate=1.5), dict(bound_samples=0)):
        with pytest.raises(ValueError):
            MaskedDiffusionConfig(**bad)
