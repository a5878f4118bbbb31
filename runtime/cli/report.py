"""rich tables shared by several commands."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def parity_table(report: dict[str, Any]) -> Table:
    """Per-output parity figures; bundles from before the float64 criterion show max-abs only."""
    if "noise_ratio" not in report:
        title = f"parity vs source model (max-abs tolerance {report.get('tolerance', float('nan')):g})"
    else:
        title = (f"parity vs float64 source model (allowed: {report['noise_ratio']:g} x float32 noise "
                 f"+ {report['noise_floor']:g}; top-1 agreement {report['top1_agreement']:.2%})")
    table = Table(title=title)
    for column in ("output", "max-abs", "fp32 max-abs", "ratio", "allowed", "ok"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for name, values in report["outputs"].items():
        ok = values.get("passed", values["max_abs"] <= report.get("tolerance", 0.0))
        ratio = values.get("ratio")
        table.add_row(name, f"{values['max_abs']:.2e}", _figure(values.get("fp32_max_abs")),
                      "-" if ratio is None else f"{ratio:.2f}", _figure(values.get("allowed")), "✓" if ok else "✗")
    return table


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"
