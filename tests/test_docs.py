"""The README and docs/ hang together: every docs page is linked from the README, every relative
link (and its #anchor) resolves, and every command shown (`python -m MODULE --flag ...`, a script,
`make TARGET`, `pip install ".[extra]"`) names a module, file, target or extra that exists and only
flags that the module's `--help` (or the script's argparse) lists."""
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^([ \t]*)```([^\n]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)
SHELL_FENCES = {"", "sh", "bash", "shell", "console", "text"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:\S*/)?(?:python3?|make|bash|pytest|pip)\s+\S")
SEPARATORS = {";", "&&", "||", "|", "&"}
SHELL_WORDS = {"do", "then", "else", "time", "exec"}
LOCAL_FILE = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.(?:py|sh)$")


def page_name(path):
    return path.relative_to(ROOT).as_posix()


def split_fences(text):
    """(the text outside fenced blocks, the bodies of the shell (or unlabelled) fenced blocks)."""
    blocks = [m.group(3) for m in FENCE.finditer(text) if m.group(2).strip().lower() in SHELL_FENCES]
    return FENCE.sub("", text), blocks


def links(path):
    prose, _ = split_fences(path.read_text())
    prose = INLINE.sub("", prose)
    return [t for t in LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path):
    prose, _ = split_fences(path.read_text())
    seen, out = {}, set()
    for heading in HEADING.findall(prose):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def commands(path):
    """Each command line shown in a page: fenced lines, and inline code that starts like a command."""
    prose, blocks = split_fences(path.read_text())
    found = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if COMMAND_START.match(line) or line.startswith("for "):
                found.append(line)
    for span in INLINE.findall(prose):
        span = " ".join(span.split())
        if COMMAND_START.match(span):
            found.append(span)
    return found


def simple_commands(line):
    """Split a shell line into simple commands (token lists), dropping env assignments and keywords."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current = [], []
    for token in list(lexer) + [";"]:
        if token in SEPARATORS or set(token) <= set(";&|"):
            while current and (current[0] in SHELL_WORDS or re.match(r"^[A-Z_][A-Z0-9_]*=", current[0])):
                current.pop(0)
            if current and current[0] not in {"for", "done", "fi", "while", "if"}:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


ALL_COMMANDS = [(page_name(p), c) for p in PAGES for c in commands(p)]


@functools.lru_cache(maxsize=None)
def module_help(module):
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"python -m {module} --help failed:\n{run.stderr[-2000:]}"
    return run.stdout


@functools.lru_cache(maxsize=None)
def make_targets():
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_.][^:=#\n]*):(?!=)", text, re.M):
        targets.update(m.group(1).split())
    return targets


def flags(args):
    """(flag, value or None) for every --flag in args."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            if not eq:
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
            out.append((flag, value))
    return out


def has_flag(text, flag):
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


def check_module(module, args, shown):
    text = module_help(module)
    for flag, value in flags(args):
        assert has_flag(text, flag), f"{shown}: `python -m {module} --help` lists no {flag}"
        choices = re.search(re.escape(flag) + r"[ =]\{([^}]*)\}", text)
        if choices and value is not None:
            assert value in choices.group(1).split(","), f"{shown}: {flag} {value} not in {{{choices.group(1)}}}"
        if flag == "--preset" and value is not None:
            assert re.search(r"(?<![\w-])" + re.escape(value) + r"(?![\w-])", text), f"{shown}: no preset {value}"


def check_script(script, args, shown):
    path = ROOT / script
    assert path.is_file(), f"{shown}: no file {script}"
    source = path.read_text()
    for flag, _ in flags(args):
        assert re.search(r"[\"']" + re.escape(flag) + r"[\"']", source), f"{shown}: {script} takes no {flag}"


def check_pip(args, shown):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for arg in args:
        m = re.fullmatch(r"\.\[([^\]]*)\]", arg)
        if m:
            missing = {e.strip() for e in m.group(1).split(",")} - extras
            assert not missing, f"{shown}: pyproject.toml has no extra {missing}"


def check_command(tokens, shown):
    program, *args = tokens
    name = program.rsplit("/", 1)[-1]
    for arg in args:
        if LOCAL_FILE.match(arg):
            assert (ROOT / arg).is_file(), f"{shown}: no file {arg}"
    if name == "make":
        for target in (a for a in args if not a.startswith("-") and "=" not in a):
            assert target in make_targets(), f"{shown}: the Makefile has no target {target}"
    elif name.startswith("python") and args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "pip":
            check_pip(rest, shown)
        else:
            check_module(module, rest, shown)
    elif name.startswith("python") and args:
        check_script(args[0], args[1:], shown)
    elif name == "pip":
        check_pip(args, shown)
    elif name in ("bash", "pytest"):
        assert args and (ROOT / args[0]).exists(), f"{shown}: no file {args[:1]}"


def test_pages_exist():
    assert len(DOCS) >= 7, [page_name(p) for p in DOCS]


def test_readme_is_short():
    # 220 lines held the overview; the peak-memory, fine-tuning and family results (their tables and
    # plots belong in the README) take it to 250 at most: everything else lives in docs/
    assert len(README.read_text().splitlines()) <= 250


def test_every_docs_page_is_linked_from_readme():
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in links(README) if t.split("#", 1)[0]}
    missing = [page_name(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {page_name(dest)}")
    assert not bad, f"{page_name(page)}: {bad}"


def test_commands_are_found():
    shown = {c for _, c in ALL_COMMANDS}
    assert "make bench" in " ".join(shown) and "make test" in " ".join(shown)
    assert any("python -m snsm.bench" in c for c in shown)


@pytest.mark.parametrize("page,line", ALL_COMMANDS, ids=[f"{p}:{c[:50]}" for p, c in ALL_COMMANDS])
def test_command_is_real(page, line):
    shown = f"{page}: `{line}`"
    tokens = simple_commands(line)
    assert tokens, shown
    for command in tokens:
        check_command(command, shown)
