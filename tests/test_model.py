"""The model module: transformer properties, schedules, objectives, samplers and the likelihood bound."""
import io
import json
import math

import pytest
import torch

from nanochat.diffusion_roberta import (
    OBJECTIVES, SCHEDULES, WARP_BINS, WARP_FLOOR, DiffusionConfig, DiffusionRoBERTa, NoiseSchedule, alpha_bar, apply_rotary,
    alpha_sigma, block_attention_mask, rotary_cos_sin,
)
from nanochat.gpt import GPT, GPTConfig, KVCache


def tiny_config(**kw):
    base = dict(depth=1, vocab_size=32, max_seq_len=16, embed_dim=8)
    return DiffusionConfig(**{**base, **kw})


def randomize(model, seed=0):
    """Random weights everywhere (the real init zeroes the head and residual projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.size(-1) ** -0.5)
    return model


def test_bidirectional_attention():
    model = randomize(DiffusionRoBERTa(tiny_config())).eval()
    z = torch.randn(1, 16, 8)
    gamma = torch.zeros(1)
    known = torch.zeros(1, 16, dtype=torch.bool)
    out = model.denoise(z, gamma, known, torch.zeros_like(z))
    z2 = z.clone()
    z2[0, -1] += 1.0  # change only the last position
    out2 = model.denoise(z2, gamma, known, torch.zeros_like(z))
    assert not torch.allclose(out[0, 0], out2[0, 0]), "the first position must see the last one"


def test_rope_relative_position():
    cos, sin = rotary_cos_sin(32, 16)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rotary(q.view(1, 1, 1, 16).expand(1, 32, 1, 16), cos, sin)[0, m, 0]
        kn = apply_rotary(k.view(1, 1, 1, 16).expand(1, 32, 1, 16), cos, sin)[0, n, 0]
        return (qm * kn).sum()

    assert torch.allclose(score(3, 1), score(20, 18), atol=1e-5)
    assert torch.allclose(score(0, 5), score(10, 15), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_schedule_table_matches_seed():
    t = torch.tensor([0, 500, 999]) / 1000
    ab = alpha_bar("cosine", t)
    assert ab.dtype == torch.float64
    assert ab[0] > 0.99999 and abs(ab[1] - 0.5) < 0.01 and 0.5e-4 <= ab[2] <= 2e-4
    for name in SCHEDULES:
        ab = alpha_bar(name, torch.linspace(0, 1, 101))
        assert (ab[1:] <= ab[:-1]).all(), f"{name} must lose signal monotonically"


@pytest.mark.parametrize("name", SCHEDULES)
def test_truncated_schedule_endpoints_and_slope(name):
    sched = NoiseSchedule(name, -3.0, 6.0)
    g = sched.gamma(torch.tensor([0.0, 1.0]))
    assert torch.allclose(g, torch.tensor([-3.0, 6.0], dtype=torch.float64), atol=1e-6)
    t = torch.tensor([0.3], dtype=torch.float64)
    gamma, slope = sched.gamma_and_slope(t)
    h = 1e-6
    numeric = (sched.gamma(t + h) - sched.gamma(t - h)) / (2 * h)
    assert torch.allclose(slope, numeric, rtol=1e-4)


@pytest.mark.parametrize("objective,extra", [(o, {}) for o in OBJECTIVES] + [
    ("logits", dict(posterior_input=True)), ("logits", dict(time_cond="add", token_noise_rate=1.0))])
def test_objective_overfits_one_batch(objective, extra):
    torch.manual_seed(0)
    model = DiffusionRoBERTa(tiny_config(objective=objective, **extra))
    tokens = torch.randint(0, 32, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(1)  # same noise every step: a fixed objective to overfit
        loss = model(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_gradients_reach_embeddings():
    model = DiffusionRoBERTa(tiny_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the head starts at zero: after one step the signal flows back to the input
        opt.zero_grad()
        model(torch.randint(0, 32, (2, 16))).backward()
        opt.step()
    assert model.embedding.weight.grad is not None and model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_shapes_determinism_prompt_and_known(sampler):
    model = randomize(DiffusionRoBERTa(tiny_config())).eval()
    prompt, known = [5, 6, 7], {10: 3, 15: 31}

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(3, 16, 8, sampler=sampler, prompt=prompt, known=known, generator=g)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert torch.equal(a, b), "a seeded generator must make sampling deterministic"
    assert sampler == "ddim" or not torch.equal(a, c)
    assert (a[:, :3] == torch.tensor(prompt)).all()
    assert (a[:, 10] == 3).all() and (a[:, 15] == 31).all()
    short = model.generate(2, 5, 3, sampler=sampler, clamp=True, temperature=0.7)
    assert short.shape == (2, 5) and short.max() < 32


def test_step_noise_scale_and_score_temperature():
    """A ddpm step from z = alpha_t x0 + sigma_t eps lands at alpha_s x0 + r eps + noise: the score temperature shrinks
    the remaining noise r (sharper), noise_scale scales the fresh noise, and both at 1 give VDM's posterior."""
    gamma_t, gamma_s = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = ([v.item() for v in alpha_sigma(g)] for g in (gamma_t, gamma_s))
    c = 1 - math.exp(gamma_s - gamma_t)
    x0, eps = torch.randn(2000, 8), torch.randn(2000, 8)
    z = alpha_t * x0 + sigma_t * eps

    def step(noise_scale, score_temperature, seed=0):
        g = torch.Generator().manual_seed(seed)
        return DiffusionRoBERTa._step(z, x0, gamma_t, gamma_s, "ddpm", noise_scale, score_temperature, g)

    def residual(score_temperature):  # the share of eps left in the mean
        return ((step(0.0, score_temperature) - alpha_s * x0) / eps).mean().item()

    assert residual(1.0) == pytest.approx(alpha_s / alpha_t * sigma_t * (1 - c), rel=1e-4)  # the posterior mean
    assert residual(0.9) == pytest.approx(alpha_s / alpha_t * sigma_t * (1 - c / 0.9), rel=1e-4)
    assert residual(0.9) < residual(1.0)
    assert torch.equal(step(0.0, 1.0, seed=0), step(0.0, 1.0, seed=1)), "no noise: deterministic"
    for scale in (1.0, 0.5):
        spread = (step(scale, 1.0) - step(0.0, 1.0)).std().item()
        assert spread == pytest.approx(scale * sigma_s * math.sqrt(c), rel=0.05)
    ddim = DiffusionRoBERTa._step(z, x0, gamma_t, gamma_s, "ddim", 1.0, 1.0, None)
    torch.testing.assert_close(ddim, alpha_s * x0 + sigma_s * eps, rtol=1e-5, atol=1e-5)  # the deterministic path


def test_generate_trajectory():
    model = randomize(DiffusionRoBERTa(tiny_config())).eval()
    tokens, traj = model.generate(2, 16, 4, return_trajectory=True, prompt=[1])
    assert len(traj) == 4 and all(t.shape == (2, 16) for t in traj)
    assert torch.equal(traj[-1], tokens)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(score_temperature=0.0), "score_temperature"),
    (dict(noise_scale=-0.5), "noise_scale"),
    (dict(sampler="euler"), "sampler"),
    (dict(seq_len=17), "seq_len"),
    (dict(prompt=list(range(20))), "inside seq_len"),
    (dict(known={3: 99}), "vocab_size"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = DiffusionRoBERTa(tiny_config())
    args = dict(num_samples=1, seq_len=16, num_steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(**args)


def test_config_validation_and_json_round_trip():
    cfg = tiny_config(objective="x0", schedule="sqrt", self_cond=False)
    assert DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="objective"):
        tiny_config(objective="v")
    with pytest.raises(ValueError, match="unknown config fields"):
        DiffusionConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_checkpoint_round_trip_gives_identical_outputs():
    model = randomize(DiffusionRoBERTa(tiny_config())).eval()
    buf = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    clone = DiffusionRoBERTa(DiffusionConfig.from_dict(ckpt["config"])).eval()
    clone.load_state_dict(ckpt["model"])
    tokens = torch.randint(0, 32, (2, 16))
    torch.manual_seed(0)
    a = model.nll_bound(tokens, num_t=4)
    torch.manual_seed(0)
    b = clone.nll_bound(tokens, num_t=4)
    assert torch.equal(a, b)
    ga = model.generate(2, 16, 4, generator=torch.Generator().manual_seed(3))
    gb = clone.generate(2, 16, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("block_size", [0, 4])
def test_bound_on_data_of_known_entropy(block_size):
    """I.i.d. uniform tokens over k symbols have entropy log k nats per token: a valid bound never goes
    meaningfully below it, and after training it comes close to it."""
    torch.manual_seed(0)
    k = 8
    model = DiffusionRoBERTa(DiffusionConfig(depth=1, vocab_size=16, max_seq_len=16, embed_dim=8, cond_rate=0.0,
                                             block_size=block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    true_entropy = math.log(k)

    def bound():
        model.eval()
        b = model.nll_bound(torch.randint(0, k, (128, 16)), num_t=16).mean().item()
        model.train()
        return b

    before = bound()
    for _ in range(250):
        loss = model(torch.randint(0, k, (32, 16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bound()
    assert before > after >= true_entropy - 0.02, (before, after, true_entropy)
    assert after < true_entropy * 1.10, (after, true_entropy)


def test_block_attention_mask():
    m = block_attention_mask(torch.arange(4), torch.arange(2), 2).int()  # noisy 0-3 (blocks 0, 1), clean 0-1 (block 0)
    assert m.tolist() == [
        [1, 1, 0, 0, 0, 0],  # noisy block 0: itself only
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],  # noisy block 1: itself and clean block 0
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1],  # clean block 0: clean block 0, never the noise
        [0, 0, 0, 0, 1, 1],
    ]


def test_block_diffusion_sees_earlier_blocks_clean_and_no_later_block():
    model = randomize(DiffusionRoBERTa(tiny_config(block_size=4))).eval()
    tokens = torch.randint(0, 32, (1, 16))
    z, gamma, known = torch.randn(1, 16, 8), torch.zeros(1), torch.zeros(1, 16, dtype=torch.bool)

    def logits(tokens, z):
        return model.predict_x0(z, gamma, known, torch.zeros_like(z), context=model.clean_context(tokens))[1][0]

    before = logits(tokens, z)
    later = tokens.clone()
    later[0, 9] = (later[0, 9] + 1) % 32  # a clean token of block 2
    after = logits(later, z)
    assert torch.equal(before[:12], after[:12]), "blocks 0-2 must not see block 2's clean tokens"
    assert not torch.allclose(before[12:], after[12:]), "block 3 must see block 2's clean tokens"
    z2 = z.clone()
    z2[0, 5] += 1.0  # noise of block 1
    after = logits(tokens, z2)
    assert torch.equal(before[:4], after[:4]) and torch.equal(before[8:], after[8:]), "noise stays inside its block"
    assert not torch.allclose(before[4:8], after[4:8])


def test_block_generation_is_left_to_right():
    model = randomize(DiffusionRoBERTa(tiny_config(block_size=4))).eval()

    def run(seq_len, **kw):
        return model.generate(2, seq_len, 3, prompt=[5, 6], known={9: 7}, generator=torch.Generator().manual_seed(0), **kw)

    tokens, traj = run(16, return_trajectory=True)
    assert tokens.shape == (2, 16) and (tokens[:, :2] == torch.tensor([5, 6])).all() and (tokens[:, 9] == 7).all()
    assert [t.size(1) for t in traj] == [4] * 3 + [8] * 3 + [12] * 3 + [16] * 3 and torch.equal(traj[-1], tokens)
    # a block depends only on the blocks before it: a shorter request gives the same first blocks
    assert torch.equal(run(12), tokens[:, :12]) and torch.equal(run(10)[:, :8], tokens[:, :8])


def test_block_diffusion_learns_context_a_whole_sequence_model_does_not():
    """Rows of consecutive ids (w, w+1, ...): one token gives the whole row. With the same steps, the block model
    (clean earlier blocks as context) gets far below the unigram entropy; whole-sequence diffusion, whose context
    is as noisy as the token itself, stays far above it. Both bounds stay above the true entropy."""
    k, T = 32, 16

    def bound_after_training(block_size):
        torch.manual_seed(0)
        model = DiffusionRoBERTa(DiffusionConfig(depth=1, vocab_size=k, max_seq_len=T, embed_dim=8, cond_rate=0.0,
                                                 block_size=block_size))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rows = lambda n: (torch.randint(0, k, (n, 1)) + torch.arange(T)) % k
        for _ in range(150):
            loss = model(rows(32))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval().nll_bound(rows(64), num_t=16).mean().item()

    whole, blocks = bound_after_training(0), bound_after_training(4)
    assert math.log(k) / T < blocks < 0.7 * whole, (blocks, whole)


@pytest.mark.parametrize("depth", [1, 2])
def test_local_mix_reaches_neighbours_without_attention(depth):
    """With every attention output zeroed, a position's output depends on the noisy input of the positions within
    local_mix // 2 per layer and on no others (none across a block boundary for block diffusion); without local_mix
    it depends on its own input alone. At init the mix is zero: the model computes exactly what the same weights
    compute without it."""
    def reach(local_mix, block_size=0):
        model = randomize(DiffusionRoBERTa(tiny_config(depth=depth, local_mix=local_mix, self_cond=False, block_size=block_size)))
        with torch.no_grad():
            for block in model.blocks:
                block.attn.c_proj.weight.zero_()
        z = torch.randn(1, 16, 8, requires_grad=True)
        no = torch.zeros(1, 16, dtype=torch.bool)
        model.denoise(z, torch.zeros(1), no, torch.zeros(1, 16, 8))[0, 8].sum().backward()
        return (z.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()

    assert reach(0) == [8]
    assert reach(3) == list(range(8 - depth, 9 + depth)) and reach(5) == list(range(8 - 2 * depth, 9 + 2 * depth))
    assert reach(3, block_size=4) == [8, 9, 10, 11][: 1 + depth]  # 8 starts a block: nothing from block 7 leaks in
    torch.manual_seed(0)
    plain, mixed = DiffusionRoBERTa(tiny_config(depth=depth)), DiffusionRoBERTa(tiny_config(depth=depth, local_mix=3))
    mixed.load_state_dict(plain.state_dict(), strict=False)  # the same weights; the convs keep their zero init
    tokens = torch.randint(0, 32, (2, 16))
    torch.manual_seed(1)
    a = plain.eval().nll_bound(tokens, num_t=2)
    torch.manual_seed(1)
    assert torch.equal(a, mixed.eval().nll_bound(tokens, num_t=2))
    for bad in (dict(local_mix=2), dict(local_mix=-1)):
        with pytest.raises(ValueError):
            tiny_config(**bad)


def test_flops_and_params():
    model = DiffusionRoBERTa(tiny_config(depth=2, self_cond=False))
    n = model.matmul_params()
    assert 0 < n < model.num_params()
    assert model.flops_per_token(16) == 6 * (n + 2 * 32 * 8) + 12 * 2 * 128 * 16  # + softmax @ E and the skip
    sc = DiffusionRoBERTa(tiny_config(depth=2, self_cond=True, self_cond_rate=0.5))
    assert sc.flops_per_token(16) > model.flops_per_token(16)
    pi = DiffusionRoBERTa(tiny_config(depth=2, self_cond=False, posterior_input=True))
    assert pi.flops_per_token(16) == model.flops_per_token(16) + 6 * 32 * 128  # + posterior @ W_in (V x d)
    blocks = DiffusionRoBERTa(tiny_config(depth=2, self_cond=False, block_size=4))
    assert blocks.matmul_params() == n  # the clean stream's table is a lookup
    clean = 12 / 16  # clean-stream tokens per noisy token: the 3 blocks before the last
    expected = 6 * (n + clean * (n - 128 * 32) + 2 * 32 * 8) + 12 * 2 * 128 * 16 * (1 + clean) ** 2  # not the head
    assert blocks.flops_per_token(16) == pytest.approx(expected)


def test_token_noise_gives_rows_a_noise_level_per_token():
    model = DiffusionRoBERTa(tiny_config(time_cond="add", token_noise_rate=0.5))
    torch.manual_seed(0)
    t, _ = model.sample_t(64, 16)
    per_token = (t != t[:, :1]).any(1)
    assert t.shape == (64, 16) and 0.25 < per_token.float().mean() < 0.75  # about half the rows
    strata = (t[~per_token, 0] * 64).floor()
    assert strata.unique().numel() == strata.numel()  # rows with one level keep their stratified timesteps
    assert DiffusionRoBERTa(tiny_config()).sample_t(8, 16)[0].shape == (8,)
    with pytest.raises(ValueError, match="time_cond 'add'"):
        tiny_config(token_noise_rate=0.5)


def test_time_warp_samples_where_the_loss_grows_and_keeps_the_elbo_unbiased():
    model = DiffusionRoBERTa(tiny_config(time_warp=True))
    q = model.warp_density()
    assert torch.allclose(q, torch.full((WARP_BINS,), 1 / WARP_BINS, dtype=torch.float64))  # uniform before any data
    # every bin observed once, the cross-entropy jumping from 0 to 3 across bins 8..11
    ce = torch.where(torch.arange(WARP_BINS) < 8, 0.0, torch.where(torch.arange(WARP_BINS) < 12, 1.0 * (torch.arange(WARP_BINS) - 7), 4.0))
    t_seen = (torch.arange(WARP_BINS) + 0.5) / WARP_BINS
    model.train()
    for _ in range(600):  # long enough for the pseudo-counts of the initial (uniform) curve to fade
        model.record_warp(t_seen, ce[:, None].expand(-1, 4), torch.ones(WARP_BINS, 4, dtype=torch.bool))
        model.update_time_warp()
    assert model.warp_stats.abs().sum() == 0
    q = model.warp_density()
    steep = slice(8, 12)
    assert q[steep].sum() > 0.75 and torch.allclose(q[:8], torch.full((8,), WARP_FLOOR / WARP_BINS, dtype=torch.float64), rtol=0.05)
    torch.manual_seed(0)
    t, density = model.sample_t(20000, 4)
    hist = torch.bincount((t * WARP_BINS).long(), minlength=WARP_BINS).double() / t.numel()
    assert torch.allclose(hist, q, atol=0.01)
    assert torch.allclose(density, q[(t * WARP_BINS).long()] * WARP_BINS)
    # the importance weight 1 / density makes the ELBO term's expectation that of uniform t
    f = lambda t: torch.exp(3 * t)
    assert abs((f(t) / density).mean().item() - (math.e**3 - 1) / 3) < 0.05
    # only noised tokens are recorded
    model.record_warp(torch.tensor([0.1, 0.9]), torch.ones(2, 3), torch.tensor([[True, False, False], [True, True, True]]))
    assert model.warp_stats[1].sum() == 4 and model.warp_stats[1, int(0.9 * WARP_BINS)] == 3


def test_context_gain_detects_learned_context():
    """On sequences where every token is its predecessor + 1, a denoiser trained at one noise level must beat
    the best token-alone denoiser there by a wide margin, and an untrained one must not."""
    from nanochat.evaluate import context_gain
    torch.manual_seed(0)
    V, T, B, gamma = 64, 32, 16, 1.0
    config = DiffusionConfig(vocab_size=V, depth=2, max_seq_len=T, embed_dim=16, gamma_min=gamma - 0.05,
                             gamma_max=gamma + 0.05, cond_rate=0.0, self_cond=False)
    model = DiffusionRoBERTa(config)
    batch = lambda: (torch.randint(0, V, (B, 1)) + torch.arange(T)) % V
    uniform = torch.full((V,), -math.log(V))
    untrained = context_gain(model.eval(), batch(), uniform, [gamma])[0]
    assert abs(untrained["gain"]) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = context_gain(model.eval(), batch(), uniform, [gamma])[0]
    assert trained["no_context_ce"] > 1.0 and trained["gain"] > 0.5, trained


@pytest.mark.parametrize("local_mix", [0, 1, 3])
def test_gpt_local_mix_is_causal_and_decodes_with_the_cache(local_mix):
    """The GPT's local mixing is causal: with attention zeroed, position 8 depends on the inputs of itself and its
    local_mix - 1 predecessors per layer, never on later ones; decoding token by token through the KV cache gives the
    logits of one full forward pass; at init the mix is zero, so the model computes what the plain GPT does."""
    depth = 2
    model = randomize(GPT(GPTConfig(vocab_size=32, depth=depth, max_seq_len=16, local_mix=local_mix))).eval()
    tokens = torch.randint(0, 32, (2, 16))
    caches = [KVCache() for _ in model.blocks]
    steps = [model.logits(tokens[:, :5], 0, caches)] + [model.logits(tokens[:, t:t + 1], t, caches) for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), model.logits(tokens), atol=1e-5)

    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
    h = model.wte(tokens[:1]).detach().requires_grad_(True)
    x = h
    for i, block in enumerate(model.blocks):
        x = block(model.mix_predecessors(x, model.local_mix[i]) if local_mix else x, (model.rope_cos[:, :16], model.rope_sin[:, :16]))
    x[0, 8].sum().backward()
    reach = (h.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert reach == list(range(8 - depth * max(local_mix - 1, 0), 9))

    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=32, depth=depth, max_seq_len=16))
    mixed = GPT(GPTConfig(vocab_size=32, depth=depth, max_seq_len=16, local_mix=3))
    mixed.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(plain.logits(tokens), mixed.logits(tokens))
    assert [len(mixed.param_groups()[g]) for g in ("mix", "other")] == [1, 0] and not plain.param_groups()["mix"]
    with pytest.raises(ValueError):
        GPTConfig(local_mix=-1)
