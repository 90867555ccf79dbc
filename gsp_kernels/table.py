"""Plain-text tables, the one renderer of every table the package prints (the check, the kernel
benchmark, training's summaries)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list]) -> str:
    """A table with left-aligned columns two spaces apart, a rule under the header, and no trailing
    spaces; cells are shown with ``str``."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])
