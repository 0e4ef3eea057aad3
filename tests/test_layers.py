"""Layers point one way: no library module imports ``carso_cli.cli`` or ``carso_cli.commands``.

The library (everything in ``carso_cli`` outside ``commands/``, ``cli.py`` and the ``__main__`` entry
point) is what ``import carso_cli`` gives a Python user; the CLI is built on top of it. A library module
that reached up into the CLI would drag Typer, the console and the commands' option parsing into every
``carso_cli.load`` (and make a cycle). The imports are read with ``ast``, including those inside
functions, so a lazy ``from carso_cli.cli import console`` is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import carso_cli

PACKAGE = Path(carso_cli.__file__).resolve().parent
FORBIDDEN = ("carso_cli.cli", "carso_cli.commands")
# The CLI layer itself, and ``python -m carso_cli``'s entry point (which exists to start the CLI).
CLI_LAYER = {"cli.py", "__main__.py"}


def module_name(path: Path) -> str:
    """``carso_cli/evaluation/runner.py`` → ``carso_cli.evaluation.runner`` (a package: its own name)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in ``source``, at any depth, relative ones resolved
    against ``package`` (the package the module lives in)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from carso_cli import cli`` imports the module carso_cli.cli: each name is checked too.
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def library_modules() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if "commands" not in p.relative_to(PACKAGE).parts[:1] and str(p.relative_to(PACKAGE)) not in CLI_LAYER
    )


def violations(paths: list[Path]) -> list[str]:
    """``path:line imports NAME``, one per offending import statement."""
    out: dict[tuple[str, int], str] = {}
    for path in paths:
        for line, name in imported_modules(path.read_text(), package_of(path)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                out.setdefault((str(path.relative_to(PACKAGE.parent)), line), name)
    return [f"{where}:{line} imports {name}" for (where, line), name in sorted(out.items())]


def test_the_walk_sees_every_kind_of_import() -> None:
    """The checker itself: top-level, lazy, relative and ``from package import module`` imports are seen."""
    source = (
        "import carso_cli.commands.pull\n"
        "def f():\n    from carso_cli.cli import console\n"
        "from ..commands import convert\n"
        "from carso_cli import cli\n"
        "from .. import commands\n"
        "from . import store\n"
        "from carso_cli import zoo\n"
    )
    names = {name for _, name in imported_modules(source, "carso_cli.evaluation")}
    assert {"carso_cli.commands.pull", "carso_cli.cli.console", "carso_cli.commands.convert"} <= names
    assert {"carso_cli.cli", "carso_cli.commands", "carso_cli.evaluation.store", "carso_cli.zoo"} <= names


def test_the_walk_covers_the_library_and_skips_the_cli() -> None:
    names = {module_name(p) for p in library_modules()}
    assert {"carso_cli.api", "carso_cli.distributed", "carso_cli.evaluation.runner", "carso_cli.training"} <= names
    assert not {n for n in names if n.startswith("carso_cli.commands") or n == "carso_cli.cli"}


def test_the_library_never_imports_the_cli() -> None:
    found = violations(library_modules())
    assert not found, "library modules import the CLI layer:\n" + "\n".join(found)


def test_importing_the_whole_library_loads_no_cli_module() -> None:
    """The same rule at run time: every library module imported, and neither the CLI nor a command is
    loaded along with them (an import hidden behind ``importlib`` would show here)."""
    import subprocess
    import sys

    names = [module_name(p) for p in library_modules()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'carso_cli.cli' or m.startswith('carso_cli.commands')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout


# Issue 19's sizes: a command module only parses options and calls the library (under 200 lines), and a
# function fits on a screen (60 lines, its docstring included). A function allowed more says why here.
COMMAND_LINES = 200
FUNCTION_LINES = 60
LONGER_FUNCTIONS: dict[str, str] = {}


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` over ``limit`` lines, decorators excluded."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_size_check_sees_a_long_function() -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(FUNCTION_LINES))
    source = f"def short():\n    pass\n\nclass A:\n    def long(self):\n{body}"
    assert long_functions(source, FUNCTION_LINES) == [("long", FUNCTION_LINES + 1)]


def test_command_modules_are_thin() -> None:
    commands = sorted((PACKAGE / "commands").glob("*.py"))
    assert len(commands) > 10
    over = {p.name: n for p in commands if (n := len(p.read_text().splitlines())) >= COMMAND_LINES}
    assert not over, f"command modules of {COMMAND_LINES} lines or more: {over}"


def test_no_function_is_over_sixty_lines() -> None:
    found = [
        f"{p.relative_to(PACKAGE.parent)}: {name} ({n} lines)"
        for p in sorted(PACKAGE.rglob("*.py"))
        for name, n in long_functions(p.read_text(), FUNCTION_LINES)
        if f"{p.relative_to(PACKAGE.parent)}:{name}" not in LONGER_FUNCTIONS
    ]
    assert not found, "functions over 60 lines:\n" + "\n".join(found)
