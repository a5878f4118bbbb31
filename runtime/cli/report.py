"""rich tables shared by several commands."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def parity_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"parity vs source model (max-abs tolerance {report['tolerance']:g})")
    table.add_column("output")
    table.add_column("max-abs", justify="right")
    table.add_column("mean-abs", justify="right")
    table.add_column("ok")
    for name, values in report["outputs"].items():
        ok = values["max_abs"] <= report["tolerance"]
        table.add_row(name, f"{values['max_abs']:.2e}", f"{values['mean_abs']:.2e}", "✓" if ok else "✗")
    return table
