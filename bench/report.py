"""The bench's table (for people) and JSON (for machines): one row per figure."""
import json
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Figure:
    figure: str                     # what was measured
    measured: float
    unit: str                       # "ms", "jobs/s", "MB", "failed"
    floor: Optional[float] = None   # the same work done by the bare tools, same unit
    ratio: Optional[float] = None   # how much worse than the floor (1.0 = as good)
    target: str = ""                # e.g. "<= 1.5x"
    result: str = "INFO"            # PASS, FAIL or INFO (no target)
    detail: str = ""                # rounds, spread, what the floor is made of
    samples: dict = field(default_factory=dict)


def judge(value, limit):
    return "PASS" if value <= limit else "FAIL"


def _number(value, unit):
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "jobs/s":
        return f"{value:.0f} jobs/s"
    return f"{value:g} {unit}"


def table(figures, header):
    rows = [("figure", "measured", "floor", "ratio", "target", "result")]
    for fig in figures:
        rows.append((fig.figure, _number(fig.measured, fig.unit), _number(fig.floor, fig.unit),
                     "-" if fig.ratio is None else f"{fig.ratio:.2f}x", fig.target or "-", fig.result))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = [header, ""]
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * width for width in widths))
    details = [f"  {fig.figure}: {fig.detail}" for fig in figures if fig.detail]
    if details:
        lines += ["", "how each figure was measured:"] + details
    return "\n".join(lines)


def write_json(path, figures, header, meta):
    document = {"header": header, **meta, "figures": [asdict(fig) for fig in figures]}
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
        stream.write("\n")
