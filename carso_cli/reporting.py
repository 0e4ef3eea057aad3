"""Table 2's columns of several runs in one table, for a paper or a leaderboard: what ``carso report`` writes.

Reads the ``results.json`` that ``carso eval`` writes under RUN/eval/*/ (read defensively: a results
file of another version, a missing column or an ``adaptive`` block of any shape only leave cells
empty), and writes Markdown, a LaTeX ``tabular`` (no package needed), CSV, or the ``model_info`` JSON
entry of RobustBench's leaderboard files, with the fields carso cannot know left empty and named.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carso_cli.display import column_label, format_eps, percent
from carso_cli.errors import CarsoError

# Table 2's columns (AT = the adversarially-trained classifier alone, C = CARSO), then PGD+EoT (Table 14).
TABLE2 = ["AT/Cl", "C/Cl", "AT/AA", "C/randAA", "AT/PGD+EoT", "PGD+EoT"]
# RobustBench's model_info fields, in its order; carso fills the ones it knows.
ROBUSTBENCH_FIELDS = [
    "name",
    "link",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "unreliable",
    "footnote",
]


@dataclass
class Row:
    run: str
    eps: float | None = None
    n_examples: int | None = None
    cells: dict[str, float] = field(default_factory=dict)  # column → accuracy in [0, 1]
    config: dict[str, Any] = field(default_factory=dict)


def _results_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "results.json").is_file():
        return [path / "results.json"]
    return sorted((path / "eval").glob("*/results.json"), key=lambda p: p.stat().st_mtime)


def _accuracy(m: Any) -> float | None:
    if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float)) and not isinstance(m["accuracy"], bool):
        return float(m["accuracy"])
    return None


def _adaptive(block: Any) -> dict[str, float]:
    """Columns of an ``adaptive`` block: its ``metrics`` (or itself) mapping names to {accuracy: …}."""
    if not isinstance(block, dict):
        return {}
    metrics = block.get("metrics") if isinstance(block.get("metrics"), dict) else block
    out = {}
    for name, m in metrics.items():
        acc = _accuracy(m)
        if acc is not None:
            out[name if str(name).startswith("adaptive") else f"adaptive/{name}"] = acc
    return out


def read_run(path: Path) -> list[Row]:
    """The rows of one run: one per ε it was evaluated at (an ``--eps-curve`` or an ``--eps`` evaluation is
    not the preset's row), each with every column found in that ε's results files (with more examples, or
    newer, winning). A single adaptive attack (``--attack NAME``) fills ``C/NAME``, never ``C/adaptive``:
    its worst case is one attack's, not the adaptive evaluation's."""
    files = _results_files(path)
    if not files:
        raise CarsoError(f"{path}: no results (run `carso eval --run {path}` first)")
    run_dir = path if path.is_dir() and (path / "eval").is_dir() else None
    name = path.name if path.is_dir() and run_dir else str(path)
    rows: dict[float | None, Row] = {}
    best: dict[tuple[float | None, str], int] = {}
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            raise CarsoError(f"{f} is unreadable ({err})") from None
        if not isinstance(r, dict):
            continue
        settings = r.get("settings") if isinstance(r.get("settings"), dict) else {}
        eps = float(settings["eps"]) if isinstance(settings.get("eps"), (int, float)) else None
        row = rows.setdefault(None if eps is None else round(eps, 9), Row(name, eps))
        n = r.get("n_examples") if isinstance(r.get("n_examples"), int) else 0
        for c, a in _columns(r, settings).items():
            if n >= best.get((row.eps, c), -1):
                best[(row.eps, c)] = n
                row.cells[c] = a
        row.n_examples = max(row.n_examples or 0, n) or row.n_examples
        if run_dir is None and r.get("run"):
            run_dir = Path(r["run"])
    config = _config(run_dir)
    for row in rows.values():
        row.config = config
    return sorted(rows.values(), key=lambda row: (row.eps is None, row.eps or 0.0))


def _columns(r: dict[str, Any], settings: dict[str, Any]) -> dict[str, float]:
    """One results file's columns: its metrics and its ``adaptive`` block's."""
    columns = {c: a for c, m in (r.get("metrics") or {}).items() if (a := _accuracy(m)) is not None}
    attack = settings.get("attack")
    columns = {column_label(c, attack): a for c, a in columns.items()}
    if attack in (None, "adaptive"):  # one adaptive attack alone: its block is that attack's, not C/adaptive's
        columns.update(_adaptive(r.get("adaptive")))
    return columns


def _config(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "config.toml").is_file():
        return {}
    try:
        from carso_cli.config import tomllib

        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        return {}


def columns_of(rows: list[Row]) -> list[str]:
    """Table 2's columns present in any row, in the paper's order, then the others (adaptive…) as found."""
    seen = [c for r in rows for c in r.cells]
    return [c for c in TABLE2 if c in seen] + list(dict.fromkeys(c for c in seen if c not in TABLE2))


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    cols = columns_of(rows)
    header = ["run", "ε", "n", *cols]
    body = [
        [
            r.run,
            format_eps(r.eps),
            "" if r.n_examples is None else str(r.n_examples),
            *[percent(r.cells.get(c)) for c in cols],
        ]
        for r in rows
    ]
    return header, body


def to_markdown(rows: list[Row]) -> str:
    header, body = table_cells(rows)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join([":---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "ε": r"$\varepsilon$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(rows: list[Row]) -> str:
    """A ``tabular`` with \\hline rules (compiles without extra packages); accuracies in %."""
    header, body = table_cells(rows)
    spec = "l" + "c" + "r" * (len(header) - 2)
    lines = [
        "% carso report: accuracy (%) per column of the paper's Table 2 (AT = classifier alone, C = CARSO)",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        "\\hline",
        *[" & ".join(tex_escape(c) for c in r) + r" \\" for r in body],
        "\\hline",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    header, body = table_cells(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "eps", "n", *header[3:]])
    w.writerows(body)
    return buf.getvalue()


def _architecture(net: dict[str, Any]) -> str | None:
    """RobustBench's ``architecture`` field: the classifier's source (``torchvision:resnet18``, …), or for the
    WideResNet (the default, and every run older than the sources) its depth and width."""
    source = net.get("architecture", "wideresnet")
    if source != "wideresnet":
        return f"{source} + CARSO purifier"
    if "depth" in net and "width" in net:
        return f"WideResNet-{net['depth']}-{net['width']} + CARSO purifier"
    return None


def robustbench_entry(row: Row) -> tuple[dict[str, Any], list[str]]:
    """(model_info, the fields left for the user). CARSO's AutoAttack figure is randAA (section 5.1)."""
    cfg = row.config
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    net = cfg.get("classifier", {}) if isinstance(cfg.get("classifier"), dict) else {}
    known: dict[str, Any] = {
        "dataset": data.get("dataset"),
        "eps": format_eps(row.eps) or None,
        "clean_acc": percent(row.cells.get("C/Cl")) or None,
        "autoattack_acc": percent(row.cells.get("C/randAA")) or None,
        "architecture": _architecture(net),
    }
    entry = {k: known.get(k) if known.get(k) is not None else "" for k in ROBUSTBENCH_FIELDS}
    missing = [k for k in ROBUSTBENCH_FIELDS if entry[k] == ""]
    return entry, missing


def robustbench_json(rows: list[Row]) -> tuple[str, dict[str, list[str]]]:
    """(the JSON text: one entry, or one per row; row → the fields left for the user)."""
    entries, missing = {}, {}
    several = len({r.run for r in rows}) < len(rows)  # a run evaluated at several ε: one entry each
    for r in rows:
        key = f"{r.run} (ε = {format_eps(r.eps)})" if several else r.run
        entries[key], left = robustbench_entry(r)
        if left:
            missing[key] = left
    return json.dumps(next(iter(entries.values())) if len(rows) == 1 else entries, indent=2) + "\n", missing
