"""Formatting shared by the model card's sections (``model_training.report`` and
``model_training.card_inputs``): numbers, percentages, Markdown table cells and tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NOT_MEASURED = "not measured"
DOMAIN_ORDER: tuple[str, ...] = ("isic2017", "ham10000", "pad-ufes-20")


def fmt(value: Any, digits: int = 3) -> str:
    """A number, yes/no or text for a Markdown cell; "n/a" when missing or not finite."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return cell(str(value))


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def ordered(keys: Sequence[str], preferred: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    """``preferred`` keys first, then the rest sorted, then ``last``."""
    head = [k for k in preferred if k in keys]
    tail = [k for k in last if k in keys and k not in head]
    middle = sorted(k for k in keys if k not in head and k not in tail)
    return head + middle + tail


def pct(value: Any) -> str:
    """A share as a percentage with one decimal; "n/a" when missing."""
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return f"{float(value):.1%}"
    return "n/a"
