"""
Controllable generation, measured: classifier-free guidance of a labelled diffusion checkpoint (trained with
--label_column) at several guidance weights w, for labels and for prompts.

    python -m scripts.guidance_eval --checkpoint CKPT --judge GPT_CKPT --data_dir DIR --guidance 0,1,2,4

Label guidance: for every label of the checkpoint, --num_samples samples of --sample_len tokens from BOS asked for
that label, at each w. Label accuracy is the share of them that a classifier of the train split (naive Bayes over
token bigrams, nanochat/label_classifier.py) assigns to the label asked for; the classifier's own accuracy on
validation text cut into chunks of --sample_len tokens comes first: the most the measure can show. Judge NLL: nats
per token under the GPT judge (same tokenizer), with the samples' unigram entropy beside it (repetition fakes a good
NLL).
Prompt guidance: --num_prompts prompts, the first --prompt_len tokens of the validation documents long enough to hold
a sample, one continuation each at each w, without a label: the judge's NLL of the continuation given the prompt
(the whole sequence scored, only the continuation averaged) and its entropy; the documents' own continuations are
the reference row.
Every w starts from the same noise (paired), w = 0 is the unguided sampler; ± are standard errors over samples.
Prints the table and writes it to --output (JSON, every figure and a few samples) and beside it as markdown (.md).
"""

import argparse
import json
import math
import os

import torch
from tqdm import tqdm

from nanochat.checkpoint import load_model
from nanochat.common import (
    UserError, autocast_for, check_seed, check_writable, compute_init, finite, fmt, run_main, write_text_atomic,
)
from nanochat.label_classifier import LabelClassifier, accuracy_summary, chunks, labelled_documents
from nanochat.sample_quality import judge_figures, load_judge, unigram_entropy
from nanochat.sampling import add_sampler_args, decode, generate, progress_total, sampler_options, sampler_settings


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="a diffusion model file trained with --label_column")
    a("--judge", required=True, help="gpt checkpoint that scores the samples (the same tokenizer)")
    a("--data_dir", default=None, help="the shards the checkpoint was trained on (train split: the classifier; val: its "
      "accuracy and the prompts); default $NANOCHAT_BASE_DIR/base_data")
    a("--label_column", default=None, help="the column of the labels (default: the checkpoint's --label_column)")
    a("--guidance", default="0,1,2,4", help="comma-separated guidance weights w >= 0 (0 = unguided)")
    a("--num_samples", type=int, default=16, help="samples per label and w")
    a("--sample_len", type=int, default=128, help="tokens per sample, BOS included")
    a("--num_steps", type=int, default=None, help="denoising steps (default: the model's, 128)")
    a("--num_prompts", type=int, default=32, help="validation prompts, one continuation each per w (0 = skip)")
    a("--prompt_len", type=int, default=32, help="tokens per prompt (after BOS)")
    a("--temperature", type=float, default=1.0, help="divides the logits and scales the sampler's noise")
    a("--batch_size", type=int, default=None, help="samples per generate() call (default: all of a label, or all the "
      "prompts, at once)")
    a("--output", default="guidance_eval.json", help="the JSON results; the markdown table goes beside it (.md)")
    a("--seed", type=int, default=42)
    a("--device_type", default="", help="cuda | mps | cpu (default: autodetect)")
    add_sampler_args(p, conditioning=False)
    return p.parse_args(argv)


def parse_weights(text):
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--guidance takes comma-separated numbers, e.g. 0,1,2,4; got {text!r}") from None
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise UserError(f"--guidance weights must be finite and >= 0 (0 = unguided), got {text!r}")
    return weights


def check_args(args):
    args.weights = parse_weights(args.guidance)
    for name in ("num_samples", "prompt_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_prompts < 0:
        raise UserError(f"--num_prompts must be >= 0 (0 = skip prompt guidance), got {args.num_prompts}")
    if args.sample_len < 2:
        raise UserError(f"--sample_len must be >= 2 (BOS + at least one token), got {args.sample_len}")
    if args.num_prompts and args.prompt_len > args.sample_len - 2:
        raise UserError(f"--prompt_len {args.prompt_len} leaves no continuation in --sample_len {args.sample_len} "
                        f"(BOS + prompt + at least one token)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    check_seed(args.seed)
    check_writable(args.output, "--output", kind="file")


def load(args, device):
    """(model, tokenizer, judge, label column, the checkpoint's step), each checked against the request."""
    model, tokenizer, ckpt = load_model(args.checkpoint, device, expect="diffusion")
    if not model.config.labels:
        raise UserError(f"{args.checkpoint} was trained without --label_column: it has no labels to guide; train one "
                        f"with --label_column (e.g. --label_column source)")
    column = args.label_column or ckpt["meta"].get("args", {}).get("label_column")
    if not column:
        raise UserError(f"{args.checkpoint} does not say which column its labels come from: pass --label_column")
    judge = load_judge(args.judge, tokenizer, device)
    limit = min(model.config.max_seq_len, judge.config.max_seq_len)
    if args.sample_len > limit:
        raise UserError(f"--sample_len {args.sample_len} is longer than the model's or the judge's max_seq_len ({limit})")
    return model, tokenizer, judge, column, ckpt["step"]


def continuation_figures(judge, rows, bos, context=0):
    """Judge NLL (nats per scored token, and its stderr over the rows) and unigram entropy of rows (token lists with
    BOS first), the first `context` tokens after BOS (a prompt) not scored."""
    q = judge_figures(judge, [r[1:] for r in rows], bos, context)
    return dict(judge_nll=q["gen_nll"], judge_nll_stderr=q["gen_nll_stderr"],
                entropy=unigram_entropy([r[1 + context:] for r in rows]))


def label_guidance(args, model, tokenizer, judge, classifier, options, device, autocast):
    """A row per w: label accuracy (± stderr, by label), judge NLL (± stderr), entropy, and a sample per label."""
    bos, labels = tokenizer.get_bos_token_id(), model.config.labels
    cells = [(w, label) for w in args.weights for label in labels]
    total = sum(progress_total(model, args.num_samples, args.sample_len, {0: bos}, args.batch_size, args.temperature,
                               **options, label=label, guidance=w) for w, label in cells)
    rows = {w: [] for w in args.weights}
    with tqdm(total=total, desc="label guidance", unit="step") as bar, autocast:
        for w, label in cells:
            g = torch.Generator(device=device).manual_seed(args.seed)  # every w from the same noise
            ids = generate(model, args.num_samples, args.sample_len, {0: bos}, args.temperature, args.batch_size, g, bar,
                           **options, label=label, guidance=w)
            rows[w] += [(label, row) for row in ids.tolist()]
    results = []
    for w in args.weights:
        asked = [label for label, _ in rows[w]]
        samples = [row for _, row in rows[w]]
        predicted = classifier.classify(torch.tensor(samples))
        acc = accuracy_summary([p == a for p, a in zip(predicted, asked)], asked)
        with autocast:
            quality = continuation_figures(judge, samples, bos)
        results.append(dict(guidance=w, label_accuracy=acc["accuracy"], label_accuracy_stderr=acc["stderr"],
                            label_accuracy_by_label=acc["per_label"], **quality,
                            samples={label: decode(tokenizer, samples[asked.index(label)]) for label in labels}))
        print(f"label guidance w={w:g}: label accuracy {acc['accuracy']:.3f} ± {acc['stderr']:.3f}, judge NLL "
              f"{quality['judge_nll']:.3f} ± {quality['judge_nll_stderr']:.3f}, entropy {quality['entropy']:.3f}")
    return results


def validation_prompts(docs, args):
    """The first --num_prompts validation documents that hold a sample: their first --sample_len tokens (BOS first)."""
    long_enough = [ids[:args.sample_len] for ids, _ in docs if len(ids) >= args.sample_len]
    if len(long_enough) < args.num_prompts:
        raise UserError(f"the val split has {len(long_enough)} documents of at least --sample_len {args.sample_len} "
                        f"tokens, fewer than --num_prompts {args.num_prompts}")
    return long_enough[:args.num_prompts]


def prompt_guidance(args, model, tokenizer, judge, docs, options, device, autocast):
    """The reference row (the documents' own continuations), then a row per w: continuation judge NLL given the prompt
    (± stderr) and entropy."""
    bos, P = tokenizer.get_bos_token_id(), args.prompt_len
    prompts = validation_prompts(docs, args)
    known = {p: [doc[p] for doc in prompts] for p in range(1 + P)}  # a prompt per sample
    n = len(prompts)
    total = sum(progress_total(model, n, args.sample_len, known, args.batch_size, args.temperature, **options, guidance=w)
                for w in args.weights)
    with autocast:
        results = [dict(guidance=None, **continuation_figures(judge, prompts, bos, context=P))]
    with tqdm(total=total, desc="prompt guidance", unit="step") as bar, autocast:
        for w in args.weights:
            g = torch.Generator(device=device).manual_seed(args.seed)  # every w from the same noise
            rows = generate(model, n, args.sample_len, known, args.temperature, args.batch_size, g, bar, **options,
                            guidance=w).tolist()
            results.append(dict(guidance=w, **continuation_figures(judge, rows, bos, context=P),
                                sample=decode(tokenizer, rows[0])))
            r = results[-1]
            tqdm.write(f"prompt guidance w={w:g}: continuation judge NLL {r['judge_nll']:.3f} ± {r['judge_nll_stderr']:.3f}, "
                  f"entropy {r['entropy']:.3f}")
    return results


def markdown(r):
    c = r["classifier"]
    lines = [
        f"Guidance of {r['checkpoint']} (step {r['step']}); judge {r['judge']}; {r['sampling']}, temperature "
        f"{r['temperature']:g}, seed {r['seed']}.",
        "",
        f"Label classifier (naive Bayes over token bigrams of the train split, by `{r['label_column']}`): accuracy "
        f"{c['accuracy']:.3f} ± {c['stderr']:.3f} (balanced {c['balanced']:.3f}) on {sum(c['count'].values())} "
        f"validation chunks of {r['sample_len']} tokens; by label: "
        + ", ".join(f"{l} {a:.2f} ({c['count'][l]})" for l, a in c["per_label"].items()),
        "",
        f"Label guidance: {r['num_samples']} samples x {r['sample_len']} tokens from BOS per label and w.",
        "",
        "| w | label accuracy | judge NLL (nats/token) | unigram entropy | accuracy by label |",
        "|---|---|---|---|---|",
    ]
    for row in r["label_guidance"]:
        by_label = ", ".join(f"{l} {a:.2f}" for l, a in row["label_accuracy_by_label"].items())
        lines.append(f"| {row['guidance']:g} | {row['label_accuracy']:.3f} ± {fmt(row['label_accuracy_stderr'], '.3f')} | "
                     f"{row['judge_nll']:.3f} ± {fmt(row['judge_nll_stderr'], '.3f')} | {row['entropy']:.3f} | {by_label} |")
    if r["prompt_guidance"]:
        lines += [
            "",
            f"Prompt guidance: {r['num_prompts']} prompts of {r['prompt_len']} tokens from validation documents, a "
            f"continuation of {r['sample_len'] - 1 - r['prompt_len']} tokens each, no label.",
            "",
            "| w | continuation judge NLL given the prompt | continuation entropy |",
            "|---|---|---|",
        ]
        for row in r["prompt_guidance"]:
            w = "validation text" if row["guidance"] is None else f"{row['guidance']:g}"
            lines.append(f"| {w} | {row['judge_nll']:.3f} ± {fmt(row['judge_nll_stderr'], '.3f')} | {row['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, judge, column, step = load(args, device)
    options = sampler_options(args, num_steps=args.num_steps, guidance=None)  # --guidance here: the weights to compare
    settings = sampler_settings(model, args.temperature, options)
    autocast = autocast_for(device, args.dtype)

    print(f"fitting the label classifier on the train split's {column!r} documents")
    classifier = LabelClassifier.fit(labelled_documents(tokenizer, "train", column, args.data_dir), tokenizer.get_vocab_size())
    if classifier.labels != model.config.labels:
        raise UserError(f"the train split's {column!r} values {classifier.labels} are not the checkpoint's labels "
                        f"{model.config.labels}: pass the --data_dir and --label_column it was trained with")
    val_docs = labelled_documents(tokenizer, "val", column, args.data_dir)
    rows, labels = chunks(val_docs, args.sample_len)
    if not labels:
        raise UserError(f"the val split has no labelled document of --sample_len {args.sample_len} tokens")
    accuracy = classifier.accuracy(rows, labels)
    print(f"classifier accuracy on {len(labels)} validation chunks of {args.sample_len} tokens: {accuracy['accuracy']:.3f} "
          f"(balanced {accuracy['balanced']:.3f})")

    result = dict(checkpoint=args.checkpoint, step=step, judge=args.judge, label_column=column,
                  labels=model.config.labels, sampling=model.describe_sampler(settings), temperature=args.temperature,
                  seed=args.seed, num_samples=args.num_samples, sample_len=args.sample_len, num_prompts=args.num_prompts,
                  prompt_len=args.prompt_len, classifier=accuracy, settings=settings)
    result["label_guidance"] = label_guidance(args, model, tokenizer, judge, classifier, options, device, autocast)
    result["prompt_guidance"] = (prompt_guidance(args, model, tokenizer, judge, val_docs, options, device, autocast)
                                 if args.num_prompts else [])

    table = markdown(result)
    print("\n" + table)
    md_path = os.path.splitext(args.output)[0] + ".md"
    write_text_atomic(args.output, json.dumps(finite(result), indent=2, ensure_ascii=False))
    write_text_atomic(md_path, table)
    print(f"wrote {args.output} and {md_path}")


if __name__ == "__main__":
    run_main(main)
