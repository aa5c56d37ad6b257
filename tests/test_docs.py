"""The docs a newcomer follows: every relative link resolves and every command shown exists.

The rules, kept simple on purpose:

- Links: every inline markdown link `[text](target)` (images too) in README.md and docs/**/*.md,
  outside fenced blocks and inline code, whose target is not a URL (`http:`, `https:`, `mailto:`).
  Its path, relative to the file's folder, must exist (a file or a folder); its `#anchor` must be
  the anchor of a heading of the target markdown file (of the same file for a bare `#anchor`).
  GitHub's anchor rule: the heading's text without markup, lowercased, every character that is not
  a letter, digit, `_`, `-` or space dropped, each space turned into `-`; a repeated heading gets
  `-1`, `-2`, ...
- Commands: the lines of fenced blocks whose language is bash, sh, shell, console or none (python
  blocks and the like are skipped). A line ending in `\\` continues on the next; a leading `$ ` and
  leading `NAME=value` assignments are dropped. A line is a command only if its first word is
  `make`, or a Python executable (`python`, `python3` or a path ending in `/python`) followed by
  `-m`; every other line (comments, output samples, diagrams) is skipped. `make <target>` needs the
  target in the Makefile; `python -m sfseg.a.b` needs src/sfseg/a/b.py or src/sfseg/a/b/__main__.py;
  `python -m <other>` needs `<other>` importable.
"""

from __future__ import annotations

import importlib.machinery
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?!=)", re.MULTILINE)
PYTHON = re.compile(r"^(.*/)?python3?(\.\d+)?$")


@dataclass(frozen=True)
class Line:
    number: int
    text: str


@dataclass(frozen=True)
class Block:
    language: str
    lines: list[Line]


def split_markdown(text: str) -> tuple[list[Line], list[Block]]:
    """The lines outside fenced blocks, and the fenced blocks with their language."""
    prose: list[Line] = []
    blocks: list[Block] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            blocks.append(Block(opening.group(2).lower(), []))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            blocks[-1].lines.append(Line(number, line))
        else:
            prose.append(Line(number, line))
    return prose, blocks


def github_anchor(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = HEADING.match(line.text)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def link_errors(path: Path, root: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    errors = []
    for line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line.text)):
            if re.match(r"^(https?|mailto):", target):
                continue
            where = f"{path.relative_to(root)}:{line.number}: link {target!r}"
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                errors.append(f"{where}: {linked} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                errors.append(f"{where}: no heading with anchor #{anchor} in {linked.relative_to(root)}")
    return errors


def shell_commands(path: Path) -> list[Line]:
    """The logical lines of the shell blocks (continuations joined, `$ ` and assignments dropped)."""
    _, blocks = split_markdown(path.read_text(encoding="utf-8"))
    commands = []
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        pending: Line | None = None
        for line in block.lines:
            text = line.text if pending is None else pending.text + " " + line.text.strip()
            start = line.number if pending is None else pending.number
            if text.rstrip().endswith("\\"):
                pending = Line(start, text.rstrip()[:-1])
                continue
            pending = None
            text = text.strip().removeprefix("$ ")
            if text and not text.startswith("#"):
                commands.append(Line(start, text))
    return commands


def words(command: str) -> list[str]:
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in a placeholder: plain words will do
        tokens = command.split()
    while tokens and ASSIGNMENT.match(tokens[0]):
        tokens.pop(0)
    return tokens


def module_exists(module: str, root: Path) -> bool:
    if module == "sfseg" or module.startswith("sfseg."):
        path = root / "src" / Path(*module.split("."))
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
    # Looked up on sys.path only: importlib.util.find_spec("pip") would reach setuptools' distutils hook,
    # which then hands the stdlib's distutils to everything after it in this process (torch.compile's C++
    # build among them: "AssertionError: .../python3.11/distutils/core.py").
    return importlib.machinery.PathFinder.find_spec(module.split(".")[0]) is not None


def command_errors(path: Path, root: Path) -> list[str]:
    targets = set(MAKE_TARGET.findall((root / "Makefile").read_text(encoding="utf-8")))
    errors = []
    for command in shell_commands(path):
        tokens = words(command.text)
        where = f"{path.relative_to(root)}:{command.number}: {command.text!r}"
        is_module_run = len(tokens) >= 3 and PYTHON.match(tokens[0]) and tokens[1] == "-m"
        if tokens[:1] == ["make"]:
            named = [token for token in tokens[1:] if not token.startswith("-") and "=" not in token]
            if named and named[0] not in targets:
                errors.append(
                    f"{where}: no make target {named[0]!r} (Makefile has {', '.join(sorted(targets))})"
                )
        elif is_module_run and not module_exists(tokens[2], root):
            errors.append(f"{where}: no module {tokens[2]!r}")
    return errors


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def test_every_relative_link_resolves():
    errors = [error for path in doc_files(ROOT) for error in link_errors(path, ROOT)]
    assert not errors, "broken links:\n" + "\n".join(errors)


def test_every_shown_command_names_an_entry_point_or_make_target():
    errors = [error for path in doc_files(ROOT) for error in command_errors(path, ROOT)]
    assert not errors, "commands that do not exist:\n" + "\n".join(errors)


def test_the_readme_opens_with_the_two_commands_the_checker_sees():
    commands = [words(command.text)[:2] for command in shell_commands(ROOT / "README.md")]
    assert commands[:2] == [["make", "train"], ["make", "test"]]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The loss: Eq. 1's CE or HRNet-OCR's OHEM", "the-loss-eq-1s-ce-or-hrnet-ocrs-ohem"),
        ("The controlled experiment (`make mechanism`)", "the-controlled-experiment-make-mechanism"),
        ("Ablation sweeps and tables (Sec. 5.4)", "ablation-sweeps-and-tables-sec-54"),
        ("OCR and CCNet (Table 5's baselines)", "ocr-and-ccnet-table-5s-baselines"),
        ("See [the index](docs/index.md) — τ × 2", "see-the-index--τ--2"),
    ],
)
def test_github_anchor(heading: str, anchor: str):
    assert github_anchor(heading) == anchor


def test_the_checker_reports_a_broken_link_a_bad_anchor_and_commands_that_do_not_exist(tmp_path: Path):
    (tmp_path / "Makefile").write_text("X := 1\n.PHONY: train\ntrain: $(X)\n\techo\n")
    (tmp_path / "src/sfseg/data").mkdir(parents=True)
    (tmp_path / "src/sfseg/train.py").write_text("")
    (tmp_path / "src/sfseg/data/validate.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/page.md").write_text("# Page\n\n## Same\n\n## Same\n")
    (tmp_path / "README.md").write_text(
        "# Title\n"
        "[ok](docs/page.md#same-1) [self](#title) [web](https://example.org) `[code](nowhere.md)`\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#other)\n"
        "```bash\n"
        "make train ARGS='x=1'   # fine\n"
        "make deploy\n"
        "PYTHONPATH=src .venv/bin/python -m sfseg.data.validate data=ade20k \\\n"
        "    data.root=/data\n"
        "python -m sfseg.evaluate ckpt_path=x\n"
        "python -m no_such_package_anywhere\n"
        "exported model.onnx (output sample, not a command)\n"
        "```\n"
        "```python\n"
        "python -m sfseg.skipped_in_python_blocks\n"
        "```\n"
        "```\n"
        "make x_in_a_plain_block\n"
        "```\n"
    )
    readme = tmp_path / "README.md"
    assert link_errors(readme, tmp_path) == [
        f"README.md:3: link 'docs/missing.md': {tmp_path / 'docs/missing.md'} does not exist",
        "README.md:3: link 'docs/page.md#other': no heading with anchor #other in docs/page.md",
    ]
    assert command_errors(readme, tmp_path) == [
        "README.md:6: 'make deploy': no make target 'deploy' (Makefile has train)",
        "README.md:9: 'python -m sfseg.evaluate ckpt_path=x': no module 'sfseg.evaluate'",
        "README.md:10: 'python -m no_such_package_anywhere': no module 'no_such_package_anywhere'",
        "README.md:17: 'make x_in_a_plain_block': no make target 'x_in_a_plain_block' (Makefile has train)",
    ]
