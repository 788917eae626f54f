"""The README and the docs say what the code does: their snippets run, their commands parse, their paths exist.

- The blocks fenced as ```python run, each page's in order, in one namespace, offline in a scratch folder; blocks
  fenced as ```py are shown only (they need the Hub, a GPU or a trained model).
- In the ```bash blocks of README.md and docs/*.md, every command that runs a Python file (`python FILE.py ...`,
  `accelerate launch [...] FILE.py ...`) names a file that exists, and its arguments parse with that script's own
  parser: whole flag names (no abbreviations), value types and choices, `--config` YAML keys. The script's
  `main(argv)` runs up to the end of its argument parsing and is stopped there, so nothing is trained or downloaded.
  `accelerate launch`'s own flags parse with Accelerate's parser.
- Every repository path (`run_scripts/...`, `configuration/...`, `modeling_mae/...`, `tests/...`, `docs/...`) the
  pages write exists, every `modeling_mae.x.y` name imports, and every relative link points to an existing file (and
  heading, when it has an `#anchor`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from accelerate.commands.launch import launch_command_parser

from modeling_mae.errors import UsageError
from modeling_mae.studies.stages import script_main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = (README, *sorted((REPO / "docs").glob("*.md")))
SHELL_OPERATORS = {"&&", "||", "|", ";"}
REDIRECTION = re.compile(r"[<>]+&?")  # shlex's words for `>`, `>>`, `2>&1` (as "2", ">&", "1"), `<`
PYTHON = {"python", "python3"}
# Folders of this repository; a path under one of them, written anywhere in a page, must exist (`data/` is left out:
# the docs also write the layouts of users' datasets, such as `data/train-00000-of-01024.parquet`).
REPOSITORY_PATH = re.compile(r"(?<![\w./-])((?:modeling_mae|run_scripts|configuration|tests|docs)/[\w./-]*\w)")
MODULE_NAME = re.compile(r"(?<![\w./-])modeling_mae(?:\.\w+)+")


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def shell_commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a bash block as its words, without comments, redirections and leading `VAR=value`
    assignments."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        words = iter([*lexer, ";"])
        for word in words:
            if REDIRECTION.fullmatch(word):
                if command and command[-1].isdigit():  # the file descriptor of `2>`
                    command.pop()
                next(words)  # the redirection's target
                continue
            if word not in SHELL_OPERATORS:
                command.append(word)
                continue
            while command and re.fullmatch(r"\w+=\S*", command[0]):
                command.pop(0)
            if command:
                yield command
            command = []


def python_invocations(page: Path) -> Iterator[tuple[list[str] | None, str, list[str]]]:
    """(`accelerate launch` flags or None, the Python file, its arguments) of each command that runs one; `...` words
    (the docs' "and other flags") are left out."""
    for block in fenced_blocks(page.read_text(), "bash"):
        for command in shell_commands(block):
            words = [word for word in command if word != "..."]
            if words[0] in PYTHON and len(words) > 1 and words[1].endswith(".py"):
                yield None, words[1], words[2:]
            elif words[:2] == ["accelerate", "launch"]:
                script_at = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
                if script_at is not None:
                    yield words[2:script_at], words[script_at], words[script_at + 1:]


class ArgumentsParsed(BaseException):
    """Raised where a script's argument parsing ends: a BaseException, so that no `except Exception` in it stops it."""


@functools.cache
def script_entry_point(script: str) -> Callable[[list[str]], Any]:
    return script_main(REPO / script)


def parse_script_arguments(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run `script`'s `main(argv)` until its arguments are parsed: None when they are valid, else the error."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.allow_abbrev = False  # the scripts take `--dataset_nam`, but the docs must write whole flags
        parse_args(parser, *args, **kwargs)
        raise ArgumentsParsed

    main = script_entry_point(script)
    stderr = io.StringIO()
    with monkeypatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except ArgumentsParsed:
            return None
        except SystemExit:  # argparse's error: the message is on stderr
            return stderr.getvalue().strip().splitlines()[-1]
        except UsageError as error:
            return str(error)
    return "main() returned without parsing its arguments"


def launcher_problem(launcher_args: list[str], script: str) -> str | None:
    """None when `accelerate launch LAUNCHER_ARGS SCRIPT` parses with Accelerate's parser, else its error."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parser = launch_command_parser()
            parser.allow_abbrev = False
            parser.parse_args([*launcher_args, script])
        except SystemExit:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def resolves(name: str) -> bool:
    """Whether `modeling_mae.a.b.c` is a module, or an attribute path inside one."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


PAGES_WITH_SNIPPETS = tuple(page for page in PAGES if fenced_blocks(page.read_text(), "python"))


def test_the_readme_has_python_snippets() -> None:
    assert README in PAGES_WITH_SNIPPETS


@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS, ids=page_id)
def test_python_snippets_run(page: Path, tmp_path, monkeypatch, hf_home) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in fenced_blocks(page.read_text(), "python"):
        exec(compile(snippet, str(page), "exec"), namespace)  # noqa: S102


def test_every_python_command_parses_with_its_scripts_parser(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the commands are written for the repository root (`--config configuration/...`)
    problems, checked = [], 0
    for page in PAGES:
        for launcher_args, script, argv in python_invocations(page):
            shown = f"{page_id(page)}: {script} {' '.join(argv)}"
            if not (REPO / script).is_file():
                problems.append(f"{shown}: no such file")
                continue
            launcher_error = launcher_problem(launcher_args, script) if launcher_args is not None else None
            error = launcher_error or parse_script_arguments(script, argv, monkeypatch)
            if error:
                problems.append(f"{shown}: {error}")
            checked += 1
    assert checked >= 20, f"only {checked} commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_the_readme_runs_the_main_scripts_and_keeps_the_ci_command() -> None:
    scripts = {script for _, script, _ in python_invocations(README)}
    expected = {f"run_scripts/{name}.py" for name in
                ("run_mae", "run_finetune", "run_knn", "run_linear_probe", "convert_checkpoint")}
    assert expected <= scripts, f"README.md does not show {sorted(expected - scripts)}"
    ci_command = 'pip install -e ".[test,deepspeed]" && pytest'
    assert ci_command in (REPO / ".ci" / "run").read_text()
    assert ci_command in fenced_blocks(README.read_text(), "bash")[0], "the README's command 2 is .ci/run's command"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_repository_paths_and_module_names_exist(page: Path) -> None:
    text = page.read_text()
    missing = [path for path in REPOSITORY_PATH.findall(text) if not (REPO / path).exists()]
    # `modeling_mae.py` is the model's file name, not a module path
    unresolved = [name for name in MODULE_NAME.findall(text) if not name.endswith(".py") and not resolves(name)]
    assert not missing, f"{page_id(page)} names paths that do not exist: {sorted(set(missing))}"
    assert not unresolved, f"{page_id(page)} names modules or attributes that do not exist: {sorted(set(unresolved))}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page_id(page)} has broken links: {broken}"
