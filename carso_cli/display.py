"""Display helpers shared by the commands and the library's reports: ε, percentages, parameter counts.

One place for each, so a table of ``eval``, ``report`` and ``extract`` writes the same ε the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def format_eps(eps: float | None) -> str:
    """8/255 when ε is a multiple of 1/255, else the float; "" for None (a run without ε)."""
    if eps is None:
        return ""
    k = round(eps * 255)
    return f"{k}/255" if abs(k / 255 - eps) < 1e-9 else f"{eps:g}"


def column_label(column: str, attack: Any) -> str:
    """The name a results column is shown under. C/adaptive exists only for ``--attack adaptive`` and for one
    of its attacks run alone (``--attack NAME``): then it is that attack's worst case, ``C/NAME``."""
    return f"C/{attack}" if column == "C/adaptive" and attack not in (None, "adaptive") else column


def percent(fraction: float | None) -> str:
    """``12.34`` (no sign) for a fraction, "" for None: the cells of ``carso report``'s tables."""
    return "" if fraction is None else f"{100 * fraction:.2f}"


def accuracy_cell(m: dict[str, Any] | None) -> str:
    """``40.62% (13/32)`` from a results.json accuracy block, "—" for None."""
    if m is None:
        return "—"
    return f"{100 * m['accuracy']:.2f}% ({m['correct']}/{m['total']})"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
