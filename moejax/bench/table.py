"""The one table `moejax bench generate` prints: a row per measurement, a column per engine and one for the
roofline or bound. A cell that failed shows a footnote mark; the footnotes below the table give the errors."""

from __future__ import annotations

import dataclasses

COLUMNS = ("moejax", "transformers generate", "transformers generate_batch", "roofline / bound")


@dataclasses.dataclass
class Missing:
    """A cell without a number: why (an error, a skip) or None for a cell that does not apply."""

    why: str | None = None
    error: bool = False


def lookup(engine: dict | None, path: tuple, error_keys: tuple = ()):
    """engine[path...] if present; else the reason it is missing: the first matching error key, the worker's own
    error or skip, or None (not measured)."""
    if engine is None:
        return Missing()
    value = engine
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            value = None
            break
        value = value[key]
    if value is not None:
        return value
    errors = engine.get("errors") or {}
    for key in error_keys:
        if key in errors:
            return Missing(errors[key], error=True)
    if engine.get("error"):
        return Missing(engine["error"], error=True)
    if engine.get("skipped"):
        return Missing(engine["skipped"])
    return Missing()


class Table:
    def __init__(self, columns: tuple[str, ...] = COLUMNS):
        self.columns = tuple(columns)
        self.rows: list[tuple[str, list, str]] = []

    def add(self, label: str, *cells, fmt: str = "{:.2f}") -> None:
        """cells: one per column; a number (shown with fmt), a string, or a Missing."""
        cells = list(cells) + [Missing()] * (len(self.columns) - len(cells))
        self.rows.append((label, cells, fmt))

    @staticmethod
    def _text(c, fmt: str) -> str:
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return fmt.format(c)
        return str(c)

    def render(self) -> str:
        notes: dict[str, int] = {}
        body = []
        for label, cells, fmt in self.rows:
            line = [label]
            for c in cells:
                if isinstance(c, Missing):
                    if c.why is None:
                        line.append("-")
                    else:
                        n = notes.setdefault(c.why, len(notes) + 1)
                        line.append(f"{'error' if c.error else 'skipped'} [{n}]")
                else:
                    line.append(self._text(c, fmt))
            body.append(line)
        header = ["measurement", *self.columns]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def fmt(r):
            return "| " + " | ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in
                                     enumerate(zip(r, widths))) + " |"

        lines = [fmt(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(fmt, body)]
        lines += [f"[{n}] {why}" for why, n in notes.items()]
        return "\n".join(lines)

    def as_json(self) -> list[dict]:
        out = []
        for label, cells, _ in self.rows:
            row = {"measurement": label}
            for name, c in zip(self.columns, cells):
                row[name] = None if isinstance(c, Missing) else c
                if isinstance(c, Missing) and c.why:
                    row[f"{name} error" if c.error else f"{name} skipped"] = c.why
            out.append(row)
        return out
