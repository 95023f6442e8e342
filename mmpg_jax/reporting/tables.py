"""The one markdown-table helper: every table of report.md and of aggregate's output is built
by `table`, so they all share one layout (and a row with a missing cell fails loudly)."""


def table(head, rows) -> list:
  """Markdown lines: the header, its rule and one line per row. Cells are strings the caller
  has formatted; every row has as many cells as the header."""
  head = [str(h) for h in head]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    row = [str(c) for c in row]
    if len(row) != len(head):
      raise ValueError(f"a table row has {len(row)} cells for {len(head)} columns: {row}")
    lines.append("| " + " | ".join(row) + " |")
  return lines
