"""Every command in the ```bash blocks of README.md and DIFFUSION_README.md runs as written: each
`python -m scripts.X` / `python -m nanochat.X` (or torchrun ... -m) names an existing module and passes only flags
that its argparse parser accepts (parsed with the script's own parser, shell variables as placeholders); the cheap
ones (--help, the demo) are run. Also: the README's test command is the one .ci/run runs, DIFFUSION_README.md has
the sections it promises and stays short (the run history lives in dev/LOG.md, dated entries newest first), and no
doc or source file outside the log speaks of task-tracker items."""
import argparse
import contextlib
import datetime
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "DIFFUSION_README.md")


def bash_blocks(doc):
    return re.findall(r"^```bash\n(.*?)^```", (REPO / doc).read_text(encoding="utf-8"), re.S | re.M)


def commands(doc):
    """Every simple command of the doc's bash blocks as a token list (comments dropped, continuations joined,
    split at && || ; | and a trailing &)."""
    out = []
    for block in bash_blocks(doc):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            current = []
            for tok in lexer:
                if tok in (";", "&", "&&", "|", "||"):
                    out.append(current)
                    current = []
                else:
                    current.append(tok)
            out.append(current)
    return [c for c in out if c]


def strip_env(cmd):
    """Leading VAR=value assignments off."""
    while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
        cmd = cmd[1:]
    return cmd


def module_call(cmd):
    """(module, args) for python -m MODULE ... / torchrun ... -m MODULE [--] ..., else None. experiments/ablate.sh
    NAME FLAGS... counts as scripts.diffusion_train FLAGS... (it passes them on)."""
    cmd = strip_env(cmd)
    if cmd[:2] == ["bash", "experiments/ablate.sh"]:
        return "scripts.diffusion_train", cmd[3:]
    if not cmd or cmd[0] not in ("python", "python3", "torchrun") or "-m" not in cmd:
        return None
    i = cmd.index("-m")
    module, args = cmd[i + 1], cmd[i + 2:]
    if cmd[0] == "torchrun" and args[:1] == ["--"]:
        args = args[1:]
    return module, args


def project_calls():
    calls = [(doc, *call) for doc in DOCS for call in map(module_call, commands(doc)) if call]
    return [c for c in calls if c[1].split(".")[0] in ("scripts", "nanochat")]


class _Parser(Exception):
    pass


def get_parser(module):
    """The argparse parser a script's main() builds (caught at its parse_args call, before it does anything)."""
    mod = importlib.import_module(module)
    original = argparse.ArgumentParser.parse_args

    original_known = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    def capture_known(self, *args, **kwargs):  # a script's own parser (a pre-parser has no --help) passing flags on
        if self.add_help:
            raise _Parser(self)
        return original_known(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = capture
    argparse.ArgumentParser.parse_known_args = capture_known
    try:
        mod.main()
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
        argparse.ArgumentParser.parse_known_args = original_known
    raise AssertionError(f"{module}.main() built no argparse parser")


def test_docs_have_commands():
    calls = project_calls()
    assert len(calls) >= 20
    modules = {m for _, m, _ in calls}
    for name in ("diffusion_train", "diffusion_sample", "diffusion_eval", "diffusion_demo", "tok_train", "tok_eval",
                 "compare", "bench"):
        assert f"scripts.{name}" in modules, name
    assert "nanochat.dataset" in modules


def check_flag_names(doc, module, parser, args):
    """Exact flag names (argparse would also take unambiguous prefixes); negative numbers are values."""
    known = set(parser._option_string_actions)
    for tok in args:
        if tok.startswith("-") and " " not in tok and not re.match(r"^-[\d.]*$", tok):
            flag = tok.split("=")[0]
            assert flag in known, f"{doc}: {module} has no flag {flag}"


@pytest.mark.parametrize("doc, module, args", project_calls(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_command_module_and_flags(doc, module, args):
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{doc}: no module {module}"
    parser = get_parser(module)
    if module == "scripts.diffusion_distill":  # its other flags are diffusion_train's
        args, rest = parser.parse_known_args(["1" if "$" in tok else tok for tok in args])[1], args
        check_flag_names(doc, "scripts.diffusion_train", get_parser("scripts.diffusion_train"), args)
        args = [tok for tok in rest if tok not in args]
    check_flag_names(doc, module, parser, args)
    for passed_on in ("--diffusion_args", "--gpt_args", "--masked_args"):  # scripts.compare's flags for diffusion_train
        if module == "scripts.compare" and passed_on in args:
            inner = shlex.split(args[args.index(passed_on) + 1])
            check_flag_names(doc, "scripts.diffusion_train", get_parser("scripts.diffusion_train"), inner)
    if "--help" in args or "-h" in args:
        return
    concrete = ["1" if "$" in tok else tok for tok in args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(concrete)
        except SystemExit:
            pytest.fail(f"{doc}: {module} {' '.join(args)}: {err.getvalue().strip()}")


def help_calls():
    return sorted({(m, tuple(a)) for _, m, a in project_calls() if "--help" in a})


@pytest.mark.parametrize("module, args", help_calls())
def test_help_commands_run(module, args, monkeypatch, capsys):
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_demo_commands_run(tmp_path):
    demos = {tuple(a) for _, m, a in project_calls() if m == "scripts.diffusion_demo" and "--checkpoint" not in a
             and "--help" not in a}
    assert demos
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "PYTHONPATH": str(REPO)}
    for args in sorted(demos):  # as written, from a fresh folder without a tokenizer
        p = subprocess.run([sys.executable, "-m", "scripts.diffusion_demo", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "final sample" in p.stdout and (tmp_path / "base" / "demo" / "diffusion_demo_schedule.png").is_file()


def test_readme_quick_start_matches_ci_and_files():
    cmds = [" ".join(c) for c in commands("README.md")]
    ci_test = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert ci_test == ["python -m pytest -q"] and "python -m pytest -q" in cmds
    first = bash_blocks("README.md")[0].strip()
    assert first == 'pip install torch==2.13.0 -e ".[dev]" && bash speedrun.sh --cpu'
    for doc in DOCS:
        for cmd in commands(doc):
            cmd = strip_env(cmd)
            if cmd and cmd[0] == "bash":
                assert (REPO / cmd[1]).is_file(), f"{doc}: {' '.join(cmd)}"


README_SECTIONS = {
    "##": ("What diffusion language models are", "Diffusion vs autoregressive GPT", "Method and architecture", "Usage",
           "Measured results", "Training tips", "Experiments to try", "Troubleshooting", "References"),
    "###": ("Transformer", "Embeddings", "Noise schedule", "Objectives", "Posterior skip", "Self-conditioning",
            "Conditional training", "Block diffusion", "Local mixing", "Samplers", "The likelihood bound",
            "Training loop", "The whole pipeline: speedrun.sh", "Data: nanochat.dataset", "Tokenizer: tok_train",
            "Training: diffusion_train", "Sampling: diffusion_sample", "Evaluation: diffusion_eval",
            "A tour: diffusion_demo", "The three models at equal compute: compare", "Throughput: bench",
            "Ablations: experiments/ablate.sh"),
}
DELETED_OPTIONS = ("--posterior_input", "--token_noise_rate", "--time_warp", "--time_cond", "--posterior_skip",
                   "--objective x0", "--ema_decay")


def section(text, title):
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)


def test_diffusion_readme_sections():
    text = (REPO / "DIFFUSION_README.md").read_text(encoding="utf-8")
    for level, titles in README_SECTIONS.items():
        headings = re.findall(rf"^{level} (.+)$", text, re.M)
        for needed in titles:
            assert any(h.startswith(needed) for h in headings), f"{level} {needed}"
    order = [re.search(rf"^## {t}", text, re.M).start() for t in README_SECTIONS["##"]]
    assert order == sorted(order), "DIFFUSION_README's sections are out of order"
    measured = section(text, "Measured results")
    assert measured.count("\n|---") == 1, "Measured results: one table of the current figures"
    assert "python -m scripts.compare" in measured, "Measured results: the command that makes the table"
    assert "](dev/LOG.md)" in measured, "Measured results: a pointer to the history"


def test_diffusion_readme_is_short():
    size = (REPO / "DIFFUSION_README.md").stat().st_size
    assert size <= 25_600, f"DIFFUSION_README.md is {size} bytes: move history to dev/LOG.md"


@pytest.mark.parametrize("doc", DOCS)
def test_docs_describe_no_deleted_option(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    assert not [o for o in DELETED_OPTIONS if o in text], "deleted options belong in dev/LOG.md only"


def repo_files(*suffixes):
    """The project's files (tracked or not yet, but not ignored) with these suffixes; hidden folders, virtual
    environments and installed packages left out."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        paths = [REPO / p for p in out if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        paths = list(REPO.rglob("*"))

    def ours(p):
        parts = p.relative_to(REPO).parts
        return not any(part.startswith(".") or part.endswith(".egg-info") or part in ("venv", "env", "site-packages")
                       for part in parts[:-1])

    return [p for p in paths if p.suffix in suffixes and ours(p) and p.is_file()]


# written so that this file does not match itself
TRACKER_TALK = re.compile(r"\bissu[e] [0-9]+|the issu[e]'s|\bthe issu[e]\b", re.I)


def test_no_tracker_talk_outside_the_log():
    files = [p for p in repo_files(".md", ".py") if p != REPO / "dev" / "LOG.md"]
    assert REPO / "DIFFUSION_README.md" in files and Path(__file__).resolve() in files
    hits = [f"{p.relative_to(REPO)}: {m.group(0)!r}" for p in files
            for m in TRACKER_TALK.finditer(p.read_text(encoding="utf-8", errors="replace"))]
    assert not hits, hits


def test_lab_log_entries_are_dated_newest_first():
    log = REPO / "dev" / "LOG.md"
    assert log.is_file(), "dev/LOG.md, the lab log, is missing"
    text = re.sub(r"^```.*?^```", "", log.read_text(encoding="utf-8"), flags=re.S | re.M)  # headings outside code
    headings = re.findall(r"^## (.*)$", text, re.M)
    assert headings, "dev/LOG.md has no entries"
    dates = []
    for h in headings:
        m = re.match(r"(\d{4})-(\d{2})-(\d{2})\b", h)
        assert m, f"dev/LOG.md: entry heading without an ISO date first: {h!r}"
        dates.append(datetime.date(*map(int, m.groups())))  # also rejects impossible dates
    assert dates == sorted(dates, reverse=True), "dev/LOG.md: entries must run newest first"


def test_every_figure_is_referenced_and_log_links_exist():
    """Each figure in docs/ is shown by DIFFUSION_README (the current results) or by the log (history)."""
    log = REPO / "dev" / "LOG.md"
    log_targets = [t for t in re.findall(r"\]\(([^)#\s]+)\)", log.read_text(encoding="utf-8")) if "://" not in t]
    assert all((log.parent / t).exists() for t in log_targets), [t for t in log_targets if not (log.parent / t).exists()]
    shown = {(log.parent / t).resolve() for t in log_targets}
    shown |= {(REPO / t).resolve() for t in re.findall(r"\]\(([^)#\s]+)\)", (REPO / "DIFFUSION_README.md").read_text(encoding="utf-8"))}
    figures = sorted((REPO / "docs").glob("*.png"))
    assert figures and not [f.name for f in figures if f.resolve() not in shown]


@pytest.mark.parametrize("doc", DOCS)
def test_images_and_local_links_exist(doc):
    """Every relative link or image of the doc (figures in docs/, files of the repository) is in the repository."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", (REPO / doc).read_text(encoding="utf-8"))
    local = [t for t in targets if "://" not in t]
    assert all((REPO / t).exists() for t in local), [t for t in local if not (REPO / t).exists()]
