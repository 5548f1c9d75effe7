"""Reading Markdown tables back out of docs and reports, for tests that check a number in
prose against the file it came from."""

from __future__ import annotations


def markdown_table(text: str, anchor: str) -> list[list[str]]:
    """The cells of each body row of the first table at or after the first line containing
    `anchor` (a heading above the table, or the start of its header row)."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if anchor in line)
    header = next(i for i in range(first, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows
