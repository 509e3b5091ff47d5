"""A minimal terminal for tests of what the command line draws."""

from __future__ import annotations


def screen(raw: str) -> list[str]:
    """The lines left on a terminal after `raw` (\\r returns to column 0, ESC[K erases to the line's end)."""
    lines: list[str] = []
    cur: list[str] = []
    col = i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del cur[col:]
            i += 3
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
        i += 1
    if cur:
        lines.append("".join(cur).rstrip())
    return lines
