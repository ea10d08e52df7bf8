"""Attribute conditioning and classifier-free guidance: labels from the data through the loader into the model (and
dropped on a share of rows), the guided sampler (w = 0 is the unguided sampler, bit for bit; w > 0 changes samples
and keeps known tokens), the label classifier, labelled checkpoints through the scripts, bad input, and a tiny model
whose labels decide its tokens, where guidance raises the share of samples that read like their label."""

import json
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanochat import train as trainer
from nanochat.checkpoint import load_model
from nanochat.common import UserError
from nanochat.dataloader import DataLoader
from nanochat.dataset import label_values, list_row_groups, read_row_group
from nanochat.sampling import generate
from nanochat.diffusion_roberta import DiffusionConfig, DiffusionRoBERTa, reverse_step, reverse_steps
from nanochat.label_classifier import LabelClassifier, chunks, labelled_documents
from nanochat.sample_quality import judge_figures, judged_nats
from nanochat.tokenizer import Tokenizer
from scripts import diffusion_demo, diffusion_eval, diffusion_sample, guidance_eval
from tests.test_model import randomize
from tests.test_scripts import assert_fails_clearly, read_jsonl

# the label decides the letters: "low" documents use words of a..m, "high" documents words of n..z
WORDS = {"low": "abc bad cab dam face gig hem jam lab mad bead deli".split(),
         "high": "nop ros stu tux vow wry zoo puny rust sty yurt word".split()}


def labelled_shards(out_dir, num_shards=4, docs_per_group=8, missing_every=0, seed=0):
    """Shards with a text and a `source` column (the last shard is val); with missing_every k, every k-th document has
    no label."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(num_shards):
        texts, sources = [], []
        for _ in range((1 if s == num_shards - 1 else 3) * docs_per_group):
            label = rng.choice(sorted(WORDS))
            texts.append(" ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(30, 80))) + ".")
            n += 1
            sources.append(None if missing_every and n % missing_every == 0 else label)
        pq.write_table(pa.table({"text": texts, "source": sources}), out_dir / f"shard_{s:05d}.parquet",
                       row_group_size=docs_per_group)
    return out_dir


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(data dir, tokenizer, tokenizer dir) of labelled shards whose labels decide the tokens."""
    data_dir = labelled_shards(tmp_path_factory.mktemp("labelled"), docs_per_group=16)
    texts = [t for path, i in list_row_groups("train", data_dir) for t in read_row_group(path, i)]
    tok = Tokenizer.train_from_iterator(iter(texts), 512)  # a token per word
    tok_dir = tmp_path_factory.mktemp("labelled_tok")
    tok.save(tok_dir)
    return data_dir, tok, tok_dir


TRAIN = ["--device_type", "cpu", "--depth", "1", "--max_seq_len", "32", "--device_batch_size", "8", "--eval_every", "-1",
         "--eval_tokens", "256", "--sample_every", "0", "--bound_samples", "2"]


@pytest.fixture(scope="module")
def labelled_ckpt(labelled, tmp_path_factory):
    """A labelled diffusion checkpoint trained by the training script on the labelled shards."""
    data_dir, _, tok_dir = labelled
    out = tmp_path_factory.mktemp("labelled_ckpt")
    trainer.main([*TRAIN, "--data_dir", str(data_dir), "--tokenizer_dir", str(tok_dir), "--label_column", "source",
                  "--num_iterations", "100", "--checkpoint_dir", str(out)])
    return out / "diffusion_step_000100.pt"


def tiny_model(labels=("a", "b"), **kw):
    config = DiffusionConfig(**{**dict(depth=1, vocab_size=32, max_seq_len=16, embed_dim=8, labels=list(labels)), **kw})
    return randomize(DiffusionRoBERTa(config)).eval()


# --- data ------------------------------------------------------------------------------------------------------------

def test_loader_yields_each_documents_label_and_resumes_exactly(labelled, tmp_path):
    _, tok, _ = labelled
    data_dir = labelled_shards(tmp_path / "shards", missing_every=5)
    labels = label_values("source", data_dir)
    assert labels == ["high", "low"]
    B, T = 3, 50  # rows span documents and row groups
    loader = DataLoader(tok, B, T, "train", data_dir, seed=1, label_column="source", labels=labels)
    plain = DataLoader(tok, B, T, "train", data_dir, seed=1)
    batches, states = [], [loader.state_dict()]
    for _ in range(12):
        tokens, ids = next(loader)
        assert tokens.shape == ids.shape == (B, T) and ids.dtype == torch.long
        assert torch.equal(tokens, next(plain))  # the same stream as without labels
        batches.append((tokens, ids))
        states.append(loader.state_dict())
    # every token carries its document's label id (BOS included), the null id (2) for a document without one
    order = list(range(len(list_row_groups("train", data_dir))))
    random.Random(1000).shuffle(order)
    rgs = list_row_groups("train", data_dir)
    expected = []
    for i in order:
        texts, values = read_row_group(*rgs[i], "source")
        for ids, value in zip(tok.encode(texts, prepend_bos=True), values):
            expected += [labels.index(value) if value else 2] * len(ids)
    flat = torch.cat([ids.flatten() for _, ids in batches]).tolist()
    assert flat == expected[:len(flat)] and {0, 1, 2} <= set(flat)
    for k in (1, 5, 9):  # resume from a state: the same batches, labels included
        resumed = DataLoader(tok, B, T, "train", data_dir, seed=1, state=states[k], label_column="source", labels=labels)
        for tokens, ids in batches[k:k + 3]:
            t, i = next(resumed)
            assert torch.equal(t, tokens) and torch.equal(i, ids)


def test_a_prompt_per_sample_is_kept_row_by_row_in_any_batching():
    model = tiny_model()
    prompts = torch.randint(0, 32, (5, 4))
    known = {0: 1, **{p: prompts[:, p - 1].tolist() for p in range(1, 5)}}
    for batch_size in (None, 2):
        ids = generate(model, 5, 16, known, batch_size=batch_size, generator=torch.Generator().manual_seed(0),
                       num_steps=3, guidance=1.0)
        assert torch.equal(ids[:, 1:5], prompts) and ids[:, 0].eq(1).all()
    with pytest.raises(UserError, match="known token ids must be < vocab_size"):
        generate(model, 2, 16, {0: 1, 1: [3, 99]}, num_steps=1)


def test_training_with_labels_fits_an_output_prior_per_label(labelled, tmp_path):
    data_dir, tok, tok_dir = labelled
    trainer.main([*TRAIN, "--data_dir", str(data_dir), "--tokenizer_dir", str(tok_dir), "--label_column", "source",
                  "--output_prior", "1", "--num_iterations", "1", "--checkpoint_dir", str(tmp_path)])
    model, _, _ = load_model(str(tmp_path / "diffusion_step_000001.pt"))
    prior = model.log_prior
    assert prior.shape == (len(model.config.labels) + 1, tok.get_vocab_size()) and torch.isfinite(prior).all()
    assert not torch.allclose(prior[0], prior[1])  # each label's own counts


def test_a_missing_label_column_names_the_columns_present(labelled, tmp_path):
    data_dir, _, tok_dir = labelled
    with pytest.raises(UserError, match=r"no 'genre' column .*columns: \['text', 'source'\]"):
        label_values("genre", data_dir)
    with pytest.raises(UserError, match="no 'genre' column"):
        trainer.main([*TRAIN, "--data_dir", str(data_dir), "--tokenizer_dir", str(tok_dir), "--label_column", "genre",
                      "--num_iterations", "1", "--checkpoint_dir", str(tmp_path)])
    with pytest.raises(UserError, match="diffusion model only, not --model gpt"):
        trainer.main(["--model", "gpt", "--label_column", "source", "--checkpoint_dir", str(tmp_path)])


def test_labelled_training_resumes_exactly(labelled, tmp_path):
    data_dir, _, tok_dir = labelled
    flags = [*TRAIN, "--data_dir", str(data_dir), "--tokenizer_dir", str(tok_dir), "--label_column", "source",
             "--num_iterations", "4", "--save_every", "2"]
    trainer.main([*flags, "--checkpoint_dir", str(tmp_path / "whole")])
    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    for name in ("diffusion_step_000004.pt", "diffusion_step_000004.state_rank0.pt", "diffusion_best.pt"):  # step 4's
        (tmp_path / "parts" / name).unlink()
    trainer.main([*flags, "--resume", "--checkpoint_dir", str(tmp_path / "parts")])  # from step 2
    whole, parts = (torch.load(tmp_path / d / "diffusion_step_000004.pt", weights_only=True) for d in ("whole", "parts"))
    assert whole["config"]["labels"] == ["high", "low"] and whole["meta"]["args"]["label_column"] == "source"
    for k, v in whole["model"].items():
        assert torch.allclose(v, parts["model"][k], rtol=0, atol=1e-6), k
    assert whole["model"]["label_embed.weight"].abs().sum() > 0  # the labels were trained


# --- the model -------------------------------------------------------------------------------------------------------

def test_labels_reach_the_model_and_dropout_replaces_them():
    model = tiny_model()
    tokens = torch.randint(0, 32, (4, 16))
    losses = []
    for labels in (torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long), None):
        torch.manual_seed(0)
        losses.append(model(tokens, labels).item())
    assert len(set(losses)) == 3  # each label, and none, is another input
    # condition dropout: the null label (2) on label_dropout of the rows, in training mode only
    model = tiny_model(label_dropout=0.3).train()
    labels = torch.randint(0, 2, (4000, 16))
    torch.manual_seed(0)
    dropped = model.drop_labels(labels, labels)
    null_rows = (dropped == 2).all(1)
    assert abs(null_rows.float().mean().item() - 0.3) < 0.03
    assert torch.equal(dropped[~null_rows], labels[~null_rows]) and not (dropped[null_rows] != 2).any()
    assert torch.equal(model.eval().drop_labels(labels, labels), labels)


def test_a_model_without_labels_trains_as_before_and_refuses_labels():
    plain, labelled = tiny_model(labels=()), tiny_model()
    assert plain.label_embed is None and labelled.label_embed.weight.shape == (3, 64)
    assert plain.matmul_params() == labelled.matmul_params()  # a per-sequence cost, as the embedding lookup
    labelled_params = {id(p) for p in labelled.param_groups()["other"]}
    assert id(labelled.label_embed.weight) in labelled_params
    tokens = torch.randint(0, 32, (2, 16))
    with pytest.raises(ValueError, match="without labels: train it with --label_column"):
        plain(tokens, torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="must have the shape of the tokens"):
        labelled(tokens, torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.parametrize("model_labels, options, message", [
    (("a", "b"), dict(label="c"), "unknown label 'c': this model's labels are a, b"),
    ((), dict(label="a"), "trained without --label_column, so it has no labels"),
    (("a", "b"), dict(guidance=-1.0), "guidance must be finite and >= 0"),
    (("a", "b"), dict(guidance=float("nan")), "guidance must be finite and >= 0"),
    (("a", "b"), dict(guidance=float("inf")), "guidance must be finite and >= 0"),
    (("a", "b"), dict(label=3), "label must be a label name"),
])
def test_bad_conditioning_is_one_clear_error(model_labels, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(model_labels).generate(1, 8, {0: 1}, num_steps=2, **options)


def test_guidance_without_a_condition_is_an_error():
    with pytest.raises(ValueError, match="there is none: give a label or known tokens"):
        tiny_model().generate(1, 8, {}, num_steps=2, guidance=1.0)


def todays_sampler(model, num_samples, seq_len, known, generator, num_steps, label=None):
    """The whole-sequence ddpm sampler at its defaults as it was before guidance (a label passed to every network
    evaluation): what w = 0 must reproduce bit for bit."""
    E, c = model.embed_matrix(), model.config
    mask = torch.zeros(num_samples, seq_len, dtype=torch.bool)
    ids = torch.zeros(num_samples, seq_len, dtype=torch.long)
    for pos, tok in known.items():
        mask[:, pos], ids[:, pos] = True, tok
    xk = F.embedding(ids, E)
    gammas = model.schedule.gamma(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64))
    levels = model.noise_level(gammas)
    steps = reverse_steps(gammas, "ddpm", 0.85, 0.9)
    labels = None if label is None else torch.full((num_samples, seq_len), model.config.labels.index(label))
    z = torch.randn(num_samples, seq_len, c.embed_dim, generator=generator)
    x0_sc = torch.zeros_like(z)
    for i in range(num_steps):
        z = torch.where(mask[..., None], xk, z)
        x0_hat, logits = model.predict_x0(z, levels.at(i), mask, x0_sc, 1.0, None, 0, labels)
        x0_hat = torch.where(mask[..., None], xk, x0_hat)
        x0_sc = x0_hat
        z = reverse_step(z, x0_hat, steps[i], generator)
    return torch.where(mask, ids, logits.argmax(-1))


def count_passes(model):
    calls = []
    denoise = model.denoise
    model.denoise = lambda *a, **k: calls.append(1) or denoise(*a, **k)
    return calls


@pytest.mark.parametrize("known, label", [({0: 1}, "b"), ({0: 1, 1: 5, 2: 7, 3: 9}, None)])
def test_neutral_guidance_is_the_unguided_sampler_bit_for_bit(known, label):
    model = tiny_model()
    calls = count_passes(model)
    runs = {}
    for name, options in (("today", None), ("default", {}), ("w=0", dict(guidance=0.0)), ("w=2", dict(guidance=2.0))):
        g = torch.Generator().manual_seed(3)
        if options is None:
            tokens = todays_sampler(model, 4, 16, known, g, 6, label)
        else:
            tokens = model.generate(4, 16, known, generator=g, num_steps=6, label=label, **options)
        runs[name] = (tokens, g.get_state(), len(calls))
        calls.clear()
    for name in ("default", "w=0"):  # the same tokens, the same random draws, one pass per step
        assert torch.equal(runs[name][0], runs["today"][0]) and torch.equal(runs[name][1], runs["today"][1])
        assert runs[name][2] == 6
    assert runs["w=2"][2] == 12 and torch.equal(runs["w=2"][1], runs["today"][1])  # two passes, no more draws
    assert not torch.equal(runs["w=2"][0], runs["today"][0])  # guidance changes the samples
    assert all((runs["w=2"][0][:, p] == t).all() for p, t in known.items())  # and keeps the known tokens


def test_guidance_with_block_diffusion_and_eps():
    for model in (tiny_model(block_size=4), tiny_model(objective="eps")):
        known = {0: 1, 1: 5}
        g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        unguided = model.generate(3, 12, known, generator=g0, num_steps=4, label="a")
        guided = model.generate(3, 12, known, generator=g1, num_steps=4, label="a", guidance=3.0)
        assert not torch.equal(unguided, guided) and (guided[:, :2] == torch.tensor([1, 5])).all()


# --- measuring -------------------------------------------------------------------------------------------------------

def test_label_classifier_and_the_continuation_nll(labelled):
    data_dir, tok, _ = labelled
    train = labelled_documents(tok, "train", "source", data_dir)
    classifier = LabelClassifier.fit(train, tok.get_vocab_size(), row_len=32)
    assert classifier.labels == ["high", "low"]
    rows, labels = chunks(labelled_documents(tok, "val", "source", data_dir), 16)
    assert len(labels) >= 10 and all(len(r) == 16 for r in rows.tolist())
    assert classifier.accuracy(rows, labels)["accuracy"] == 1.0  # disjoint letters: every chunk is told apart
    low = [tok.get_bos_token_id()] + tok.encode("abc bad cab dam face gig hem jam lab mad")
    assert classifier.classify(torch.tensor([low])) == ["low"]
    # the judge NLL of a continuation given its prompt: the whole row scored, only the continuation counted
    from nanochat.gpt import GPT, GPTConfig
    judge = randomize(GPT(GPTConfig(depth=1, vocab_size=tok.get_vocab_size(), max_seq_len=32))).eval()
    sample = low[1:]
    nats, counts = judged_nats(judge, [sample], tok.get_bos_token_id(), context=4)
    per_token = F.cross_entropy(judge.logits(torch.tensor([low[:-1]]))[0], torch.tensor(low[1:]), reduction="none")
    assert counts == [len(sample) - 4] and nats[0] == pytest.approx(per_token[4:].sum().item(), rel=1e-5)
    assert judge_figures(judge, [sample], tok.get_bos_token_id())["gen_nll"] == pytest.approx(per_token.mean().item(), rel=1e-5)


def label_accuracy(model, classifier, bos, conditioned=True, num_samples=24, **options):
    """(share of the samples asked for each label, given to the model only if conditioned, that are classified as that
    label; the classifier's mean margin in nats for the label asked for over the other)."""
    hits, margin = 0, 0.0
    for i, label in enumerate(classifier.labels):
        g = torch.Generator().manual_seed(0)
        ids = model.generate(num_samples, 24, {0: bos}, generator=g, num_steps=16, label=label if conditioned else None,
                             **options)
        scores = classifier.scores(ids)
        hits += (scores.argmax(1) == i).sum().item()
        margin += (scores[:, i] - scores[:, 1 - i]).mean().item() / len(classifier.labels)
    return hits / (num_samples * len(classifier.labels)), margin


def test_guidance_raises_label_accuracy_of_a_model_whose_labels_decide_its_tokens(labelled, labelled_ckpt):
    data_dir, tok, _ = labelled
    model, _, ckpt = load_model(labelled_ckpt)
    assert model.config.labels == ["high", "low"] and ckpt["config"]["labels"] == ["high", "low"]
    classifier = LabelClassifier.fit(labelled_documents(tok, "train", "source", data_dir), tok.get_vocab_size(), row_len=32)
    bos = tok.get_bos_token_id()
    unconditioned, _ = label_accuracy(model, classifier, bos, conditioned=False)
    conditional, conditional_margin = label_accuracy(model, classifier, bos)
    guided, guided_margin = label_accuracy(model, classifier, bos, guidance=3.0)
    assert unconditioned < 0.75 and guided >= 0.9, (unconditioned, conditional, guided)  # labels are followed
    assert guided >= conditional and guided_margin > conditional_margin + 2, (conditional_margin, guided_margin)  # more so


# --- the scripts -----------------------------------------------------------------------------------------------------

def test_labelled_checkpoint_samples_through_the_scripts(labelled, labelled_ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    diffusion_sample.main(["--checkpoint", str(labelled_ckpt), "--num_samples", "3", "--seq_len", "16", "--num_steps", "4",
                           "--label", "low", "--guidance", "2", "--prompt", "abc", "--output", str(out)])
    records = read_jsonl(out)
    assert len(records) == 3 and all(r["label"] == "low" and r["guidance"] == 2.0 for r in records)
    assert all(r["text"].startswith("abc") for r in records)
    assert "label 'low', guidance 2" in capsys.readouterr().out
    diffusion_demo.main(["--checkpoint", str(labelled_ckpt), "--num_steps", "4", "--label", "high", "--guidance", "1",
                         "--out_dir", str(tmp_path / "demo")])
    assert "label 'high', guidance 1" in capsys.readouterr().out
    data_dir = labelled[0]
    diffusion_eval.main(["--checkpoint", str(labelled_ckpt), "--data_dir", str(data_dir), "--eval_tokens", "64",
                         "--throughput_steps", "0", "--context_levels", "0", "--num_samples", "2", "--sample_len", "12",
                         "--sample_steps", "3", "--label", "low", "--guidance", "1", "--output", str(tmp_path / "e.json")])
    sampling = json.loads((tmp_path / "e.json").read_text())["sampling"]
    assert (sampling["label"], sampling["guidance"]) == ("low", 1.0) and "label 'low', guidance 1" in sampling["how"]
    with pytest.raises(UserError, match="trained without --label_column"):  # the demo's fresh model has no labels
        diffusion_demo.main(["--label", "low", "--out_dir", str(tmp_path / "demo")])


@pytest.mark.parametrize("args, message", [
    (["--label", "mid"], "unknown label 'mid': this model's labels are high, low"),
    (["--guidance", "-0.5"], "guidance must be finite and >= 0"),
    (["--guidance", "nan"], "guidance must be finite and >= 0"),
    (["--label", "low", "--checkpoint", "{plain}"], "trained without --label_column"),
])
def test_bad_conditioning_through_diffusion_sample(labelled_ckpt, tmp_path, capsys, args, message):
    plain = tmp_path / "plain.pt"
    model, tok, ckpt = load_model(labelled_ckpt)
    torch.save({**ckpt, "config": {**ckpt["config"], "labels": []},
                "model": {k: v for k, v in ckpt["model"].items() if not k.startswith("label_embed")}}, plain)
    argv = ["--checkpoint", str(labelled_ckpt), "--num_steps", "2", "--seq_len", "8"] + [a.format(plain=plain) for a in args]
    assert_fails_clearly(diffusion_sample.main, argv, capsys, message)


def test_guidance_eval_writes_the_table(labelled, labelled_ckpt, tmp_path, capsys):
    data_dir, _, tok_dir = labelled
    trainer.main(["--model", "gpt", *[a for a in TRAIN if a not in ("--bound_samples", "2")], "--data_dir", str(data_dir),
                  "--tokenizer_dir", str(tok_dir), "--num_iterations", "5", "--checkpoint_dir", str(tmp_path / "judge")])
    out = tmp_path / "g.json"
    guidance_eval.main(["--checkpoint", str(labelled_ckpt), "--judge", str(tmp_path / "judge/gpt_step_000005.pt"),
                        "--data_dir", str(data_dir), "--guidance", "0,2", "--num_samples", "3", "--sample_len", "16",
                        "--num_steps", "3", "--num_prompts", "2", "--prompt_len", "4", "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["labels"] == ["high", "low"] and r["classifier"]["accuracy"] == 1.0
    assert [row["guidance"] for row in r["label_guidance"]] == [0, 2]
    assert [row["guidance"] for row in r["prompt_guidance"]] == [None, 0, 2]  # the validation text first
    for row in r["label_guidance"] + r["prompt_guidance"]:
        assert row["judge_nll"] > 0 and row["entropy"] > 0
    table = (tmp_path / "g.md").read_text()
    assert "| 2 |" in table and "validation text" in table and table in capsys.readouterr().out
    with pytest.raises(UserError, match="--guidance weights must be finite and >= 0"):
        guidance_eval.main(["--checkpoint", str(labelled_ckpt), "--judge", "x", "--guidance", "0,-1"])
