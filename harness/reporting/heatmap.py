"""reports/heatmap.png: the matrix at a glance. Rows: cells; columns: arch/quant x native/shims; colour: verdict.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display), written atomically (temp + rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

# verdict -> (colour, legend label); the order is the legend's
COLOURS: dict[str, tuple[str, str]] = {
    "pass": ("#2ca02c", "pass"),
    "fail": ("#d62728", "FAIL (stage failed or rule broken)"),
    "error": ("#ff7f0e", "ERROR (timeout, killed, crashed)"),
    "n/a": ("#d9d9d9", "n/a (arch not in this transformers)"),
    "missing": ("#555555", "missing (lane did not run)"),
    "unresolvable": ("#9467bd", "unresolvable pins"),
    "install_failed": ("#8c564b", "install failed"),
    "conflict": ("#e7ba52", "runs disagree (see Conflicting results)"),
    "none": ("#ffffff", "no result"),
}
MODES = ("native", "shims")
ALL = "(all)/(all)"


def grid(df: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], list[list[str]]]:
    """(cells, columns as (case, mode), verdict per cell x column). A cell-level status fills its mode's row
    half; two runs that disagree make a "conflict" square."""
    df = df.assign(case=df["arch"] + "/" + df["quant"])
    cases = sorted(c for c in df["case"].unique() if c != ALL) or [ALL]
    columns = [(case, mode) for case in cases for mode in MODES]
    cells = sorted(df["cell"].unique())
    values = {(cell, col): "none" for cell in cells for col in columns}
    for (cell, case, mode), group in df.groupby(["cell", "case", "shims"]):
        verdicts = set(group["verdict"])
        value = verdicts.pop() if len(verdicts) == 1 else "conflict"
        for target in (cases if case == ALL else [case]):
            if (target, mode) in columns:
                values[(cell, (target, mode))] = value if value in COLOURS else "error"
    return cells, columns, [[values[(cell, col)] for col in columns] for cell in cells]


def write_heatmap(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cells, columns, values = grid(df)
    names = list(COLOURS)
    codes = [[names.index(v) for v in row] for row in values]
    cmap = ListedColormap([COLOURS[n][0] for n in names])
    norm = BoundaryNorm([i - 0.5 for i in range(len(names) + 1)], cmap.N)
    width = 3.0 + 0.42 * len(columns)
    height = 2.6 + 0.4 * len(cells)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(codes, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
    ax.set_yticks(range(len(cells)), labels=cells, fontsize=8)
    ax.set_xticks(range(len(columns)), labels=[f"{case} {mode}" for case, mode in columns], rotation=90,
                  fontsize=7)
    # thin white lines between squares, thicker between cases, so native/shims pairs read together
    ax.set_xticks([i - 0.5 for i in range(1, len(columns))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(cells))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    for i in range(2, len(columns), 2):
        ax.axvline(i - 0.5, color="white", linewidth=2.5)
    ax.tick_params(which="minor", length=0)
    used = [n for n in names if any(n in row for row in values)]
    ax.legend(handles=[Patch(facecolor=COLOURS[n][0], edgecolor="#999999", label=COLOURS[n][1]) for n in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or "moe-shims verdicts (native | shims)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
