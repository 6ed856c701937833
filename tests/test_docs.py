"""The README and docs/ stay true to the command tree: every `edgexfer ...` command line they show still
parses (the command exists and takes each option named), and every relative link they make leads to a file
of this repository. In-process through the console entry point (`edgexfer.entry.main`), no subprocess."""
from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`(edgexfer [^`]+)`")
OPTION = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def run_entry(args: list[str], capsys) -> tuple[int, str]:
    from edgexfer.entry import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out + out.err


def command_lines(text: str) -> list[list[str]]:
    """The `edgexfer` invocations in the fenced blocks of a Markdown text, as argument lists after the
    program (comments and line continuations handled; `python -m edgexfer[.runtime]` counts)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s|\s{2,}#", line, maxsplit=1)[0].strip()
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if w == "edgexfer" or w.endswith("/edgexfer") or (
                        w in ("edgexfer.runtime", "edgexfer") and i and words[i - 1] == "-m"):
                    found.append(words[i + 1:])
                    break
    return found


def cases() -> list:
    return [pytest.param(args, id=f"{doc.relative_to(ROOT)}: edgexfer {' '.join(args)}"[:120])
            for doc in DOCS for args in command_lines(doc.read_text())]


def test_the_docs_show_command_lines():
    assert len(cases()) >= 12  # the extraction found the examples (a broken regex would find none)


@pytest.mark.parametrize("args", cases())
def test_command_line_parses(args, capsys):
    """`edgexfer ARGS --help` exits 0: click parses every option before the eager --help answers, so an
    option the command lost (or a command that went) fails here with click's own message."""
    code, out = run_entry([*args, "--help"], capsys)
    assert code == 0, out[-800:]


@functools.lru_cache(maxsize=None)
def _help(name: str) -> str:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from edgexfer.entry import main

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            main([name, "--help"])
        except SystemExit:
            pass
    return buf.getvalue()


def test_inline_commands_name_real_options():
    """Inline code and table cells such as `edgexfer bench MODEL|RUN… [--no-e2e]`: the command exists and
    its --help lists every option the span names."""
    bad = []
    for doc in DOCS:
        for span in SPAN.findall(doc.read_text()):
            name = span.split()[1]
            if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
                continue
            text = _help(name)
            if "Usage:" not in text:
                bad.append(f"{doc.name}: `{span}`: no command {name!r}")
                continue
            for opt in OPTION.findall(span.replace("…", " ")):
                if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                    bad.append(f"{doc.name}: `{span}`: {name} has no {opt}")
    assert not bad, "\n".join(bad)


def test_relative_links_lead_to_files():
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, "links to nothing:\n" + "\n".join(bad)


def test_the_readme_is_short():
    """The README is what a newcomer reads in five minutes; the reference lives in docs/."""
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines: move reference material to docs/"


def test_the_report_table_names_every_field_of_the_schema():
    """docs/run-folder.md's report.json table against edgexfer/schemas/report.schema.json: each top-level
    section of the schema has a row, and a section's row names each field the schema gives it."""
    import json

    schema = json.loads((ROOT / "edgexfer" / "schemas" / "report.schema.json").read_text())
    defs = schema.get("$defs", {})

    def resolve(node):
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    rows: dict[str, str] = {}
    for line in (ROOT / "docs" / "run-folder.md").read_text().splitlines():
        if line.startswith("| `"):
            _, first, *rest = line.split("|")
            rows[first.strip()] = rows.get(first.strip(), "") + "|".join(rest)
    named = {name for first in rows for name in re.findall(r"`([a-z_0-9]+)", first)}
    bad = [f"section {k!r} has no row" for k in schema["properties"] if k not in named]
    for first, meaning in rows.items():
        keys = re.findall(r"`([a-z_0-9]+)`", first)
        if len(keys) != 1 or keys[0] not in schema["properties"]:
            continue
        for field in resolve(schema["properties"][keys[0]]).get("properties", {}):
            if f"`{field}`" not in meaning:
                bad.append(f"{keys[0]}.{field} is not in its row")
    assert not bad, "docs/run-folder.md's report table vs the schema:\n" + "\n".join(bad)
