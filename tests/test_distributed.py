"""carso_cli.distributed: the argv that ``--gpus N`` relaunches, rebuilt from the parsed parameters.

Every option of every command that takes ``--gpus`` is set to a value other than its default (both
sides of a ``--x/--no-x`` flag), the command line is parsed as ``carso`` parses it (nothing runs), the
worker's argv is rebuilt from that context, and it must parse back to exactly the same values.
"""

from __future__ import annotations

import importlib
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer

from carso_cli import distributed
from carso_cli.cli import COMMANDS, app

GROUP = typer.main.get_command(app)


def parse(argv: list[str]) -> Any:
    """The command's context for ``carso ARGV``, as the app builds it (the command is not run)."""
    root = GROUP.make_context("carso", list(argv))
    rest = [*getattr(root, "_protected_args", getattr(root, "protected_args", [])), *root.args]
    name, command, args = GROUP.resolve_command(root, rest)
    return command.make_context(name, args, parent=root)


def _base_type(hint: Any) -> Any:
    """``Annotated[int | None, …]`` → int; ``list[str] | None`` → list[str]."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return hint


def _value_words(param: Any, hint: Any) -> list[list[str]]:
    """Command-line words that set ``param`` to something other than its default (several for a flag)."""
    kind = _base_type(hint)
    flag = param.opts[0]
    if kind is bool:
        return [[o] for o in (*param.opts, *param.secondary_opts)]
    if typing.get_origin(kind) is list:
        return [[flag, "section.key=1", flag, "--looks-like-an-option=2"]]
    if isinstance(kind, type) and issubclass(kind, Enum):
        default = getattr(param.default, "value", param.default)
        return [[flag, next(m.value for m in kind if m.value != default)]]
    low = getattr(param, "min", None)
    if kind is int:
        return [[flag, str(low + 2 if low is not None else -3)]]
    if kind is float:
        return [[flag, repr(low + 0.125 if low is not None else -0.375)]]
    if kind is Path:
        return [[flag, "some dir/file 1.safetensors"]]
    return [[flag, "a value-7"]]


def cases() -> list[Any]:
    """(command, option words) for every option of every command that takes --gpus."""
    out = []
    for name, module in COMMANDS:
        command = GROUP.commands[name]
        if "gpus" not in {p.name for p in command.params}:
            continue
        hints = typing.get_type_hints(importlib.import_module(module).cli, include_extras=True)
        for param in command.params:
            if param.param_type_name != "option":
                continue
            for words in _value_words(param, hints[param.name]):
                out.append(pytest.param(name, words, id=f"{name} {' '.join(words[:2])}"))
    return out


def test_every_command_with_gpus_is_covered() -> None:
    assert {c.values[0] for c in cases()} >= {"train-purifier", "train-classifier", "eval"}


@pytest.mark.parametrize(("command", "words"), cases())
def test_the_relaunch_argv_parses_back_to_the_same_parameters(command: str, words: list[str]) -> None:
    ctx = parse([command, *words])
    param = next(p for p in ctx.command.params if words[0] in (*p.opts, *p.secondary_opts))
    if not param.is_flag:  # a flag is tried on both sides, one of which may be its default
        assert ctx.params[param.name] != param.default
    argv = distributed.relaunch_argv(ctx)
    assert argv[0] == command and len(argv) > 1  # the option was given, so it is passed on
    again = parse(argv)
    assert again.params == ctx.params, argv


def test_a_no_flag_survives_and_defaults_are_left_out() -> None:
    """``--no-bf16`` is a value (False) of its own, not the default (None: the preset's)."""
    ctx = parse(["train-purifier", "--preset", "smoke", "--no-bf16", "--set", "training.epochs=1"])
    assert distributed.relaunch_argv(ctx) == [
        "train-purifier",
        "--preset",
        "smoke",
        "--no-bf16",
        "--set",
        "training.epochs=1",
    ]
    assert parse(distributed.relaunch_argv(ctx)).params["bf16"] is False


def test_global_options_and_overrides_are_carried() -> None:
    ctx = parse(["--debug", "train-classifier", "--preset", "smoke", "--gpus", "2"])
    argv = distributed.relaunch_argv(ctx, out=Path("runs/c.safetensors"), epochs=None)
    assert argv == ["--debug", "train-classifier", "--preset", "smoke", "--out", "runs/c.safetensors", "--gpus", "2"]
    # The spelling torchrun cannot misread: --run-dir, never --run (an abbreviation of its --run-path).
    assert distributed.relaunch_argv(parse(["eval", "--run", "r"])) == ["eval", "--run-dir", "r"]
