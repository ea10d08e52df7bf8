"""The model module: transformer properties, schedules, objectives, samplers and the likelihood bound."""
import io
import json
import math

import pytest
import torch

from nanochat.diffusion_roberta import (
    OBJECTIVES, SCHEDULES, DiffusionConfig, DiffusionRoBERTa, NoiseSchedule, alpha_bar, alpha_sigma, block_attention_mask,
    reverse_step, reverse_steps,
)
from nanochat.evaluate import unigram_log_prior
from nanochat.gpt import GPT, GPTConfig, KVCache
from nanochat.masked_diffusion import MaskedDiffusion, MaskedDiffusionConfig
from nanochat.transformer import apply_rotary, rotary_cos_sin


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
    level = model.noise_level(torch.zeros(1, dtype=torch.float64))
    known = torch.zeros(1, 16, dtype=torch.bool)
    out = model.denoise(z, level, known, torch.zeros_like(z))
    z2 = z.clone()
    z2[0, -1] += 1.0  # change only the last position
    out2 = model.denoise(z2, level, known, torch.zeros_like(z))
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


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_overfits_one_batch(objective):
    torch.manual_seed(0)
    model = DiffusionRoBERTa(tiny_config(objective=objective))
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
        return model.generate(3, 16, dict(enumerate(prompt)) | known, generator=g, num_steps=8, sampler=sampler)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert torch.equal(a, b), "a seeded generator must make sampling deterministic"
    assert sampler == "ddim" or not torch.equal(a, c)
    assert (a[:, :3] == torch.tensor(prompt)).all()
    assert (a[:, 10] == 3).all() and (a[:, 15] == 31).all()
    short = model.generate(2, 5, temperature=0.7, num_steps=3, sampler=sampler, clamp=True)
    assert short.shape == (2, 5) and short.max() < 32


def test_step_noise_scale_and_score_temperature():
    """A ddpm step from z = alpha_t x0 + sigma_t eps lands at alpha_s x0 + r eps + noise: the score temperature shrinks
    the remaining noise r (sharper), noise_scale scales the fresh noise, and both at 1 give VDM's posterior."""
    gamma_t, gamma_s = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = ([v.item() for v in alpha_sigma(g)] for g in (gamma_t, gamma_s))
    c = 1 - math.exp(gamma_s - gamma_t)
    x0, eps = torch.randn(2000, 8), torch.randn(2000, 8)
    z = alpha_t * x0 + sigma_t * eps

    gammas = torch.stack([gamma_t, gamma_s])

    def step(noise_scale, score_temperature, seed=0):
        g = torch.Generator().manual_seed(seed)
        return reverse_step(z, x0, reverse_steps(gammas, "ddpm", noise_scale, score_temperature)[0], g)

    def residual(score_temperature):  # the share of eps left in the mean
        return ((step(0.0, score_temperature) - alpha_s * x0) / eps).mean().item()

    assert residual(1.0) == pytest.approx(alpha_s / alpha_t * sigma_t * (1 - c), rel=1e-4)  # the posterior mean
    assert residual(0.9) == pytest.approx(alpha_s / alpha_t * sigma_t * (1 - c / 0.9), rel=1e-4)
    assert residual(0.9) < residual(1.0)
    assert torch.equal(step(0.0, 1.0, seed=0), step(0.0, 1.0, seed=1)), "no noise: deterministic"
    for scale in (1.0, 0.5):
        spread = (step(scale, 1.0) - step(0.0, 1.0)).std().item()
        assert spread == pytest.approx(scale * sigma_s * math.sqrt(c), rel=0.05)
    ddim = reverse_step(z, x0, reverse_steps(gammas, "ddim", 1.0, 1.0)[0])
    torch.testing.assert_close(ddim, alpha_s * x0 + sigma_s * eps, rtol=1e-5, atol=1e-5)  # the deterministic path


def test_generate_trajectory():
    model = randomize(DiffusionRoBERTa(tiny_config())).eval()
    tokens, traj = model.generate(2, 16, {0: 1}, return_trajectory=True, num_steps=4)
    assert len(traj) == 4 and all(t.shape == (2, 16) for t in traj)
    assert torch.equal(traj[-1], tokens)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(score_temperature=0.0), "score_temperature"),
    (dict(noise_scale=-0.5), "noise_scale"),
    (dict(noise_scale=float("nan")), "noise_scale"),
    (dict(sampler="euler"), "sampler"),
    (dict(top_k=3), "no sampler option top_k"),
    (dict(seq_len=17), "seq_len"),
    (dict(known=dict(enumerate(range(20)))), "inside seq_len"),
    (dict(known={3: 99}), "vocab_size"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = DiffusionRoBERTa(tiny_config())
    args = dict(num_samples=1, seq_len=16, num_steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(**args)


def test_gpt_generate_continues_a_prompt_only():
    gpt = randomize(GPT(GPTConfig(vocab_size=32, depth=1, max_seq_len=16))).eval()
    steps = []
    out = gpt.generate(2, 10, {0: 1, 1: 2}, generator=torch.Generator().manual_seed(0), callback=lambda: steps.append(1))
    assert out.shape == (2, 10) and (out[:, :2] == torch.tensor([1, 2])).all() and len(steps) == gpt.progress_steps(10, {0: 1, 1: 2}, {})
    for bad, message in (({3: 1}, "continues a prompt"), ({}, "continues a prompt")):
        with pytest.raises(ValueError, match=message):
            gpt.generate(1, 10, bad)
    with pytest.raises(ValueError, match="no sampler option num_steps"):
        gpt.generate(1, 10, {0: 1}, num_steps=8)


def test_config_validation_and_json_round_trip():
    cfg = tiny_config(objective="eps", schedule="sqrt", self_cond=False)
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
    ga = model.generate(2, 16, generator=torch.Generator().manual_seed(3), num_steps=4)
    gb = clone.generate(2, 16, generator=torch.Generator().manual_seed(3), num_steps=4)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("block_size", [0, 4])
def test_bound_on_data_of_known_entropy(block_size):
    """I.i.d. uniform tokens over k symbols have entropy log k nats per token: a valid bound never goes
    meaningfully below it, and after training it comes close to it."""
    torch.manual_seed(0)
    k = 8
    # 8-d embeddings are told apart by the token-alone posterior only at low noise: the range starts at -3 (at the
    # default low end the bound's reconstruction term alone would keep it loose)
    model = DiffusionRoBERTa(DiffusionConfig(depth=1, vocab_size=16, max_seq_len=16, embed_dim=8, cond_rate=0.0,
                                             block_size=block_size, gamma_min=-3.0))
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
        return model.predict_x0(z, model.noise_level(gamma), known, torch.zeros_like(z), context=model.clean_context(tokens))[1][0]

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
        return model.generate(2, seq_len, {0: 5, 1: 6, 9: 7}, generator=torch.Generator().manual_seed(0), num_steps=3, **kw)

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
        # gamma_min -0.5: with 8-d embeddings the default's reconstruction term (at gamma 0.5) would dominate both bounds
        model = DiffusionRoBERTa(DiffusionConfig(depth=1, vocab_size=k, max_seq_len=T, embed_dim=8, cond_rate=0.0,
                                                 block_size=block_size, gamma_min=-0.5))
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
        model.denoise(z, model.noise_level(torch.zeros(1, dtype=torch.float64)), no, torch.zeros(1, 16, 8))[0, 8].sum().backward()
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
    blocks = DiffusionRoBERTa(tiny_config(depth=2, self_cond=False, block_size=4))
    assert blocks.matmul_params() == n  # the clean stream's table is a lookup
    clean = 12 / 16  # clean-stream tokens per noisy token: the 3 blocks before the last
    expected = 6 * (n + clean * (n - 128 * 32) + 2 * 32 * 8) + 12 * 2 * 128 * 16 * (1 + clean) ** 2  # not the head
    assert blocks.flops_per_token(16) == pytest.approx(expected)


def test_context_gain_detects_learned_context():
    """On sequences where every token is its predecessor + 1, a denoiser trained at one noise level must beat
    the best token-alone denoiser there by a wide margin, and an untrained one must not."""
    torch.manual_seed(0)
    V, T, B, gamma = 64, 32, 16, 1.0
    config = DiffusionConfig(vocab_size=V, depth=2, max_seq_len=T, embed_dim=16, gamma_min=gamma - 0.05,
                             gamma_max=gamma + 0.05, cond_rate=0.0, self_cond=False)
    model = DiffusionRoBERTa(config)
    batch = lambda: (torch.randint(0, V, (B, 1)) + torch.arange(T)) % V
    uniform = torch.full((V,), -math.log(V))
    untrained = model.eval().context_gain(batch(), uniform, [gamma])[0]
    assert abs(untrained["gain"]) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = model.eval().context_gain(batch(), uniform, [gamma])[0]
    assert trained["no_context_ce"] > 1.0 and trained["gain"] > 0.5, trained


def test_gpt_kv_cache_decodes_as_one_forward_pass():
    model = randomize(GPT(GPTConfig(vocab_size=32, depth=2, max_seq_len=16))).eval()
    tokens = torch.randint(0, 32, (2, 16))
    caches = [KVCache() for _ in model.blocks]
    steps = [model.logits(tokens[:, :5], 0, caches)] + [model.logits(tokens[:, t:t + 1], t, caches) for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), model.logits(tokens), atol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: (DiffusionRoBERTa, tiny_config(depth=2, block_size=4)),
    lambda: (GPT, GPTConfig(vocab_size=32, depth=2, max_seq_len=16)),
    lambda: (MaskedDiffusion, MaskedDiffusionConfig(vocab_size=32, depth=2, max_seq_len=16)),
], ids=["diffusion", "gpt", "masked"])
def test_meta_device_build_gives_the_weights_of_a_normal_build(build):
    """build() makes the model on the meta device (nothing allocated) and materialises it: the same weights and
    buffers as a normal build with the same seed, and the same outputs."""
    cls, config = build()
    with torch.device("meta"):
        shell = cls(config)
    assert all(p.is_meta for p in shell.parameters()) and shell.rope_cos.is_meta
    torch.manual_seed(5)
    normal = cls(config)
    torch.manual_seed(5)
    built = cls.build(config, "cpu")
    a, b = normal.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(normal.rope_cos, built.rope_cos) and torch.equal(normal.rope_sin, built.rope_sin)
    tokens = torch.randint(0, 32, (2, 16))
    torch.manual_seed(0)
    la = normal(tokens)
    torch.manual_seed(0)
    assert torch.equal(la, built(tokens))


def test_output_prior_makes_the_untrained_model_the_best_token_alone_denoiser():
    """With output_prior the model fits the training tokens' unigram frequencies, and before training it is exactly
    the best denoiser that sees each token alone (no context gain, at every noise level); the GPT takes no prior."""
    torch.manual_seed(0)
    V, T, B = 32, 16, 8
    skewed = lambda: torch.multinomial(torch.arange(1, V + 1).float() ** 3, B * T, replacement=True).view(B, T)
    model = DiffusionRoBERTa(tiny_config(vocab_size=V, max_seq_len=T, output_prior=True))
    batches = [skewed() for _ in range(4)]
    model.fit_unigram_prior(iter(batches))
    log_prior = unigram_log_prior(batches, V)
    assert torch.allclose(model.log_prior, log_prior)
    rows = model.eval().context_gain(skewed(), log_prior, [-1.0, 2.0, 5.0])
    assert all(abs(r["gain"]) < 1e-4 for r in rows), rows
    assert rows[-1]["model_ce"] < math.log(V) - 0.3  # the prior, not a uniform guess, at high noise
    restored = DiffusionRoBERTa(model.config)
    restored.load_state_dict(model.state_dict())  # saved with the weights
    assert torch.equal(restored.log_prior, model.log_prior)
    off = DiffusionRoBERTa(tiny_config(vocab_size=V, max_seq_len=T))
    off.fit_unigram_prior(iter(batches))
    assert off.log_prior is None and "log_prior" not in off.state_dict()  # checkpoints without the prior load as before
    GPT(GPTConfig(depth=1, vocab_size=V, max_seq_len=T)).fit_unigram_prior(iter(()))  # no prior: nothing read


def test_a_labelled_models_output_prior_is_each_labels_own():
    """With labels, the prior is fitted per label (the null label: all tokens), and before training the label alone
    moves the prediction by exactly the difference of its prior and the null label's."""
    torch.manual_seed(0)
    V, T, B = 32, 16, 8
    model = DiffusionRoBERTa(tiny_config(vocab_size=V, max_seq_len=T, output_prior=True, labels=["a", "b"])).eval()
    # label a writes tokens 0-15, label b tokens 16-31
    batches = [(torch.randint(0, 16, (B, T)) + 16 * (l := torch.randint(0, 2, (B, 1))), l.expand(B, T)) for _ in range(4)]
    model.fit_unigram_prior(iter(batches))
    assert torch.allclose(model.log_prior[0], unigram_log_prior((t[l == 0] for t, l in batches), V))
    assert torch.allclose(model.log_prior[2], unigram_log_prior((t for t, _ in batches), V))
    assert model.log_prior[0, :16].min() > model.log_prior[0, 16:].max()
    z, level = torch.randn(1, T, 8), model.noise_level(torch.tensor([4.0], dtype=torch.float64))
    known, sc = torch.zeros(1, T, dtype=torch.bool), torch.zeros(1, T, 8)
    _, uncond = model.predict_x0(z, level, known, sc)
    _, cond = model.predict_x0(z, level, known, sc, labels=torch.zeros(1, T, dtype=torch.long))
    assert torch.allclose(cond - uncond, (model.log_prior[0] - model.log_prior[2]).expand(1, T, V), atol=1e-5)


def test_steps_spaced_in_log_snr_share_the_ends_of_the_steps_spaced_in_t():
    """spacing="log_snr" puts the sampler's step ends evenly in gamma between the same two ends as the default
    (evenly in t); a bad spacing is one clear error."""
    model = DiffusionRoBERTa(DiffusionConfig(vocab_size=64, depth=1, max_seq_len=16, embed_dim=8))
    by_t, by_gamma = model.step_gammas(8), model.step_gammas(8, "log_snr")
    assert torch.allclose(by_gamma[[0, -1]], by_t[[0, -1]]) and by_t[0] > by_t[-1]
    assert torch.allclose(by_gamma.diff(), by_gamma.diff()[0].expand(8)) and not torch.allclose(by_t.diff(), by_t.diff()[0].expand(8))
    ids = model.generate(2, 16, {0: 1}, generator=torch.Generator().manual_seed(0), num_steps=3, sampler="ddim", spacing="log_snr")
    assert ids.shape == (2, 16) and ids[:, 0].eq(1).all()
    with pytest.raises(ValueError, match="spacing must be one of"):
        model.generate(1, 16, spacing="cosine")
