"""The docs say what the code is: every file, module and symbol they name exists where they say, every
project command in them parses with its CLI's own parser, every flag of every CLI is on its page, every
test file is in docs/testing.md, and `model` imports neither `sweep` nor `analysis`.

The rules are written out in docs/testing.md ("What the docs test checks"); the checkers below take text
so that the tests at the end can show each one catching a broken page.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import importlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sweep", "analysis")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Each CLI (a module name, or a pattern such as model.bench*) and the page that documents its flags.
CLI_PAGES = {
    "model.train": "docs/training.md",
    "model.data": "docs/data.md",
    "model.schema": "docs/results.md",
    "model.bench*": "docs/benchmarks.md",
    "model.metrics.inception": "docs/inception.md",
    "sweep.grid": "docs/sweeps.md",
    "sweep.search": "docs/search.md",
    "sweep.reevaluate": "docs/analysis.md",
    "analysis.report": "docs/analysis.md",
    "analysis.legacy": "docs/analysis.md",
}

PYTHON_M = r"python3? -m "
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
IDENT = r"[A-Za-z_]\w*(?:\.(?!(?:py|md|json|toml)`)[A-Za-z_]\w*)?"
PY_PATH = r"(?:[\w-]+/)*[\w-]+\.py"
# `path.py` `name`, `path.py` (`name`, `other`): names right after a path, separated only by spaces,
# commas and an opening parenthesis, are that file's.
AFTER_PATH = re.compile(rf"`({PY_PATH})`((?:[ \t]*[(,]?[ \t]*`{IDENT}(?:\(\))?`)+)")
# `name` in `path.py`
NAME_IN_PATH = re.compile(rf"`({IDENT})(?:\(\))?` in `({PY_PATH})`")
REPO_PATH = re.compile(r"(?:model|sweep|analysis|tests|clusters|docs|\.ci)/[\w./*-]*")
FILE_SUFFIX = re.compile(r"\.(?:py|md|json|toml|ya?ml|txt|png|html|parquet|csv|npz|pt|pth)$")
DOTTED = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def code_lines(text: str) -> Iterator[str]:
    """The lines of the page's fenced code blocks, backslash continuations joined."""
    for block in FENCE.findall(text):
        yield from block.replace("\\\n", " ").splitlines()


# ------------------------------------------------------------------------------------ (a) names


def module_file(dotted: str) -> Path | None:
    """The file of module `dotted` (a.b -> a/b.py or a/b/__init__.py), or None."""
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defined(body: list[ast.stmt]) -> dict[str, list[ast.stmt] | None]:
    """Names a module or class body defines (def, class, assignment; inside top-level if/try too);
    classes map to their body."""
    names: dict[str, list[ast.stmt] | None] = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = node.body
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = None
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = None
        elif isinstance(node, ast.If | ast.Try):
            for sub in (
                node.body,
                node.orelse,
                getattr(node, "finalbody", []),
                *getattr(node, "handlers", []),
            ):
                names.update(_defined(sub.body if isinstance(sub, ast.ExceptHandler) else sub))
    return names


def defines(path: Path, name: str, reexports: bool = False) -> bool:
    """Whether `path` defines `name` (`function`, `Class`, `CONSTANT`) or `Class.member` itself (an
    import does not count: the docs name where a thing lives; with `reexports`, a package's `__init__.py`
    may import it, as `model.metrics.kid` names an API)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if reexports and path.name == "__init__.py":
        imported_names = {
            a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names
        }
        if name in imported_names:
            return True
    scope: list[ast.stmt] | None = tree.body
    for part in name.split("."):
        names = _defined(scope or [])
        if part not in names:
            return False
        scope = names[part]
    return True


def bare_file(name: str) -> list[Path]:
    """The project files called `name` (a bare `config.py`)."""
    return sorted(p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob(name))


def resolve_py(path: str) -> tuple[Path | None, str | None]:
    """The file a docs path names, or None and why not."""
    if "/" in path:
        return (ROOT / path, None) if (ROOT / path).is_file() else (None, f"`{path}` does not exist")
    found = bare_file(path)
    if len(found) == 1:
        return found[0], None
    if not found:
        return None, f"`{path}` is no file of the project"
    where = ", ".join(str(p.relative_to(ROOT)) for p in found)
    return None, f"`{path}` is ambiguous ({where}): write its path"


def name_problems(text: str) -> list[str]:
    """Files, modules and symbols the page's prose names that are not where it says."""
    problems: list[str] = []
    body = prose(text)
    for span in SPAN.findall(body):
        span = span.strip()
        if REPO_PATH.fullmatch(span):
            if not list(ROOT.glob(span.rstrip("/"))):
                problems.append(f"`{span}` does not exist")
        elif re.fullmatch(r"[\w-]+\.py", span):
            problems.extend(why for _, why in [resolve_py(span)] if why)
        elif (m := DOTTED.match(span)) and not FILE_SUFFIX.search(m.group()):
            problems.extend(dotted_problem(m.group()))
    pairs = [(p, n) for p, names in AFTER_PATH.findall(body) for n in re.findall(rf"`({IDENT})", names)]
    pairs += [(p, n) for n, p in NAME_IN_PATH.findall(body)]
    for path, name in pairs:
        file, why = resolve_py(path)
        if file is None:
            problems.append(why or path)
        elif not defines(file, name):
            problems.append(f"`{name}` is not defined in `{file.relative_to(ROOT)}`")
    return problems


def dotted_problem(dotted: str) -> list[str]:
    """`a.b.name`: the longest module prefix must exist and define the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        file = module_file(".".join(parts[:cut]))
        if file is not None:
            rest = ".".join(parts[cut:])
            if rest and not defines(file, rest, reexports=True):
                return [f"`{dotted}`: `{rest}` is not defined in `{file.relative_to(ROOT)}`"]
            return []
    return [f"`{dotted}`: no such module"]


def layout_problems(text: str) -> list[str]:
    """Files and folders of the README's layout block (the code block that starts with `model/`) that do
    not exist: a word ending in `.py` or `/` names a file or folder of the top-level folder its section
    starts with (a path with a `/` inside is from the root; `*` globs)."""
    blocks = [b for b in FENCE.findall(text) if b.startswith("model/")]
    problems, top = [], ""
    for line in blocks[0].splitlines() if blocks else []:
        if re.match(r"\S", line):
            top = line.split()[0]
        for word in re.split(r"[\s,;:()`]+", line):
            if not re.fullmatch(r"[\w*][\w*.-]*(?:/[\w*.-]+)*/?", word) or not word.endswith((".py", "/")):
                continue
            path = word if "/" in word.rstrip("/") or line.startswith(word) else top + word
            if not list(ROOT.glob(path.rstrip("/"))):
                problems.append(f"{path} (layout line {line.strip()!r})")
    return problems


# ------------------------------------------------------------------------------------ (b) commands


def build_parser(module: str) -> argparse.ArgumentParser:
    """The CLI's own parser: `build_parser()` of the module (or of its package's `__main__`)."""
    mod = importlib.import_module(module)
    if not hasattr(mod, "build_parser") and module_file(module) and module_file(module).name == "__init__.py":
        mod = importlib.import_module(f"{module}.__main__")
        if not hasattr(mod, "build_parser") and hasattr(mod, "main"):  # `from model.x.y import main`
            mod = importlib.import_module(mod.main.__module__)
    assert hasattr(mod, "build_parser"), f"{module} has no build_parser(): expose its argparse parser"
    return mod.build_parser()


PROJECT_COMMAND = re.compile(rf"(?:^|[\s;&|(]){PYTHON_M}(?:{'|'.join(PACKAGES)})\.")
SHELL_SPLIT = {"&&", "||", ";", "|"}
REDIRECT = re.compile(r"\d?>>?|<|\d?>&\d")


def commands(line: str) -> Iterator[tuple[str, list[str]]]:
    """(module, arguments) of each `python -m <project module>` in a shell line. A `...` argument is an
    elision and dropped; a synopsis (`[--flag X]`, `a|b`) counts with its brackets removed and the first
    alternative."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as err:
        raise AssertionError(f"cannot split {line!r}: {err}") from err
    command: list[str] = []
    for token in [*tokens, ";"]:
        if token not in SHELL_SPLIT:
            command.append(token)
            continue
        words = list(_drop_redirects(command))
        command = []
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)  # environment assignments
        if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
            if words[2].split(".")[0] in PACKAGES:
                yield words[2], _synopsis(words[3:])


def _drop_redirects(words: list[str]) -> Iterator[str]:
    skip = False
    for word in words:
        if skip:
            skip = False
        elif REDIRECT.fullmatch(word):
            skip = "&" not in word
        else:
            yield word


def _synopsis(args: list[str]) -> list[str]:
    if not any("[" in a for a in args):
        return [a for a in args if a != "..."]
    out = []
    for a in args:
        a = a.strip("[]")
        if a and a != "..." and not a.endswith("..."):
            out.append(a.split("|")[0])
    return out


def command_problems(text: str) -> list[str]:
    """Project command lines in the page's code blocks (and inline `python -m ...` spans) that their
    CLI's parser refuses."""
    lines = [s for s in code_lines(text) if PROJECT_COMMAND.search(s)]
    lines += [s for s in SPAN.findall(prose(text)) if re.match(r"python -m \S+ .*--", s)]
    problems = []
    for line in lines:
        for module, args in commands(line):
            err = io.StringIO()
            try:
                parser = build_parser(module)
            except ModuleNotFoundError as e:
                problems.append(f"{line.strip()!r}: {e}")
                continue
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args(args)
                except SystemExit as e:
                    if e.code:
                        problems.append(f"{line.strip()!r}: {err.getvalue().strip().splitlines()[-1]}")
    return problems


# ------------------------------------------------------------------------------------ (c) flags


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long flag and subcommand of the parser, its subcommands' included (--help aside)."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out |= {name} | flags(sub)
        out |= {s for s in action.option_strings if s.startswith("--") and s != "--help"}
    return out


def missing_flags(parser: argparse.ArgumentParser, page: str) -> list[str]:
    """Flags and subcommands of the parser that the page never writes."""
    return sorted(f for f in flags(parser) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", page))


def cli_modules() -> set[str]:
    """Every module of the project that runs as `python -m`: a `__main__.py` (its package) or a module
    with an `if __name__ == "__main__":` block."""
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if path.name == "__main__.py":
                out.add(".".join(parts[:-1]))
            elif re.search(r"^if __name__ == .__main__.:", path.read_text(encoding="utf-8"), re.M):
                out.add(".".join(parts[:-1] if path.name == "__init__.py" else parts))
    return out


# ------------------------------------------------------------------------------------ (d) imports


def imported(source: str, package: tuple[str, ...]) -> Iterator[str]:
    """Absolute names of every module a file of `package` imports, anywhere in it (functions included)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            yield ".".join([*base, node.module] if node.module else base)


# ------------------------------------------------------------------------------------ (e) registries


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each body row of the first Markdown table under `heading` (up to the next heading)."""
    section = prose(text).split(heading, 1)[1].split("\n#", 1)[0]
    table = section[section.index("\n|") :].split("\n\n", 1)[0]  # the first table: up to a blank line
    lines = [line.strip() for line in table.splitlines() if line.strip()]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    return rows


def registry_problems(text: str) -> list[str]:
    """Every evidence rule of model/rules.py in the rules table of estimators.md with its minimum chains
    ("M >= k" in the needs column, empty for 1), every gradient estimator in the gradients table under its
    field, and no documented entry that the registries lack."""
    from model import rules

    problems = []
    documented = {}
    for cells in table_rows(text, "## The evidence rules"):
        documented[cells[0].strip("`")] = cells[-1]
    for name, rule in rules.EVIDENCE_RULES.items():
        want = "" if rule.min_chains == 1 else f"M >= {rule.min_chains}"
        if name not in documented:
            problems.append(f"ti_rule {name} is not in the rules table")
        elif documented[name] != want:
            problems.append(f"ti_rule {name} needs {want!r}, the table says {documented[name]!r}")
    problems += [
        f"ti_rule {n} is documented but not registered" for n in documented if n not in rules.EVIDENCE_RULES
    ]
    field = ""
    listed = set()
    for cells in table_rows(text, "## The gradients"):
        field = cells[0].strip("`") or field
        listed.add((field, cells[1].strip("`")))
    registries = {"ebm_gradient": rules.EBM_GRADIENTS, "gen_gradient": rules.GEN_GRADIENTS}
    expected = {(f, n) for f, registry in registries.items() for n in registry}
    problems += [f"{f}={n} is not in the gradients table" for f, n in sorted(expected - listed)]
    problems += [f"{f}={n} is documented but not registered" for f, n in sorted(listed - expected)]
    return problems


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_module_and_symbol_the_docs_name_exists_there(page: Path) -> None:
    assert name_problems(page.read_text(encoding="utf-8")) == []


def test_every_file_of_the_readmes_layout_exists() -> None:
    assert layout_problems((ROOT / "README.md").read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_of_the_docs_leads_to_a_file(page: Path) -> None:
    text = prose(page.read_text(encoding="utf-8"))
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_project_command_in_the_docs_parses_with_its_cli(page: Path) -> None:
    assert command_problems(page.read_text(encoding="utf-8")) == []


def page_of(module: str) -> str | None:
    return next((page for pattern, page in CLI_PAGES.items() if fnmatch.fnmatchcase(module, pattern)), None)


def test_every_cli_has_a_page() -> None:
    assert [m for m in sorted(cli_modules()) if page_of(m) is None] == []
    assert all(any(fnmatch.fnmatchcase(m, p) for m in cli_modules()) for p in CLI_PAGES), "a CLI is gone"


@pytest.mark.parametrize("module", sorted(cli_modules()))
def test_every_flag_of_every_cli_is_on_its_page(module: str) -> None:
    page = page_of(module)
    assert page, f"{module}: add its page to CLI_PAGES"
    assert missing_flags(build_parser(module), (ROOT / page).read_text(encoding="utf-8")) == [], page


def test_every_test_file_is_named_in_testing_md() -> None:
    page = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+\.py)`", page))
    assert sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in named) == []


def test_model_imports_neither_sweep_nor_analysis() -> None:
    """The dependency direction of the README, read from the source (every import, also inside
    functions), so an import on a path no test runs is caught too."""
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "model").rglob("*.py"))
        for name in imported(path.read_text(encoding="utf-8"), path.relative_to(ROOT).parent.parts)
        if name.split(".")[0] in ("sweep", "analysis")
    ]
    assert bad == []


def test_estimators_md_lists_every_registered_rule_and_gradient() -> None:
    assert registry_problems((ROOT / "docs" / "estimators.md").read_text(encoding="utf-8")) == []


# ------------------------------------------------------------------------------------ the checks bite

BROKEN = """
The step is `model/step.py` `loss_fn`, `no_such_step`; `check_devices` in `step.py`;
`model.step.learning_rate_schedules_gone`, `model/no_such_file.py`, `nowhere.py`.

```bash
python -m sweep.grid --grid digits --no-such-flag \\
    --name x   # a comment
python -m model.train --epochs three
```
"""


def test_the_name_check_catches_stale_names() -> None:
    problems = name_problems(BROKEN)
    assert any("no_such_step" in p for p in problems)
    assert any("check_devices" in p for p in problems)
    assert any("learning_rate_schedules_gone" in p for p in problems)
    assert any("no_such_file.py" in p for p in problems)
    assert any("nowhere.py" in p for p in problems)
    assert not any("loss_fn" in p for p in problems)
    assert name_problems("`check_devices` in `model/config.py`; `model.step.learning_rate_schedules`") == []


def test_the_layout_check_catches_a_moved_file() -> None:
    layout = "```\nmodel/      the science\n  gone.py        moved away\n  metrics/   fine\n```\n"
    assert layout_problems(layout) == ["model/gone.py (layout line 'gone.py        moved away')"]


def test_the_command_check_catches_unknown_flags_and_bad_values() -> None:
    problems = command_problems(BROKEN)
    assert len(problems) == 2 and "--no-such-flag" in problems[0] and "three" in problems[1]
    ok = "```\nFOO=1 python -m sweep.grid --name RUN --resume > log.txt 2>&1 && echo done  # fine\n```\n"
    assert command_problems(ok) == []
    assert list(commands("python -m analysis.report RUN [RUN ...] --out DIR [--log-x auto|yes|no]")) == [
        ("analysis.report", ["RUN", "RUN", "--out", "DIR", "--log-x", "auto"])
    ]


def test_the_flag_check_catches_an_undocumented_flag() -> None:
    parser = build_parser("sweep.grid")
    page = (ROOT / "docs" / "sweeps.md").read_text(encoding="utf-8")
    assert missing_flags(parser, page.replace("--retry-errored", "--retry")) == ["--retry-errored"]


def test_the_import_scan_sees_imports_inside_functions_and_relative_ones() -> None:
    source = "def f():\n    from sweep import grid\n    import analysis.report\n    from ..x import y\n"
    assert sorted(imported(source, ("model", "metrics"))) == ["analysis.report", "model.x", "sweep"]


def test_the_readmes_sample_epoch_line_is_what_the_loop_prints() -> None:
    from model.loop import format_readings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(s for s in code_lines(readme) if "] epoch" in s)
    keys = "epoch train_loss val_loss grad_mean grad_var grad_var_ebm grad_var_gen epoch_time_s val_ll"
    keys += " val_ll_stderr kid_rbf_inf fid_inf"
    number = r"(-?[\d.]+(?:e[-+]\d+)?)"
    pattern = (
        r"\[[^\]]+\] epoch +(\d+)  loss {n}  val {n}  grad mean {n} var {n} \(ebm {n}, gen {n}\)  {n}s"
        r"  val_ll {n} \+- {n}  KID_inf {n} FID_inf {n}"
    ).replace("{n}", number)
    match = re.fullmatch(pattern, line.strip())
    assert match, f"the README's sample line has not the fields model/loop.py format_readings prints: {line}"
    readings = {k: float(v) for k, v in zip(keys.split(), match.groups(), strict=True)}
    readings["epoch"] = int(readings["epoch"])
    assert line.strip().split("] ", 1)[1] == format_readings(readings)


def test_the_registry_check_catches_a_missing_rule_and_a_wrong_minimum() -> None:
    page = (ROOT / "docs" / "estimators.md").read_text(encoding="utf-8")
    dropped = "\n".join(line for line in page.splitlines() if not line.startswith("| `stepping_stone`"))
    assert registry_problems(dropped) == ["ti_rule stepping_stone is not in the rules table"]
    wrong = page.replace("| M >= 6 |", "| M >= 5 |", 1)
    assert registry_problems(wrong) == ["ti_rule kl_example needs 'M >= 6', the table says 'M >= 5'"]
    gone = "\n".join(line for line in page.splitlines() if not line.startswith("| | `none` |"))
    assert registry_problems(gone) == ["ebm_gradient=none is not in the gradients table"]


def model_import_graph() -> dict[str, set[str]]:
    """model's modules -> the model modules each imports anywhere in it (functions included) but in its
    command line's `main`, which may dispatch a subcommand to the module that implements it (`python -m
    model.metrics.inception verify` runs model.metrics.reference.verify, which checks the port); `from pkg
    import sub` counts as an import of the submodule when `sub` is one."""
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "model").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = path.relative_to(ROOT).parent.parts
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        in_main = {id(n) for m in mains for n in ast.walk(m)}
        for node in ast.walk(tree):
            if id(node) in in_main:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else ()
                module = ".".join([*base, node.module] if node.module else base)
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in files]
                targets = subs or [module]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle through two or more modules, as one path each (found by depth-first search)."""
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return cycles


def test_model_has_no_import_circles() -> None:
    """No module of model/ reaches itself through imports (deferred ones inside functions included):
    model.data <-> model.tfds_data and evaluator -> inception -> verify -> evaluator were broken."""
    assert import_cycles(model_import_graph()) == []


def test_the_circle_check_finds_a_deferred_circle() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
