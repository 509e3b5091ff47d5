"""Where the API's CPU time goes, from py-spy's raw samples (`py-spy record -f raw`: one line per distinct
stack, `frame;frame;...;leaf COUNT`, each frame `function (file:line)`).

Two views, both in percent of all samples of the recorded processes:
  * self time by package: each sample is charged to the package of its innermost frame (FastAPI, psycopg,
    redis, uvicorn, asyncio, ...; our own code by file), which says which library does the work;
  * inclusive time of our own functions: a sample counts once for every qaas function on its stack, which
    says which request step the time is under.

    python bench/load/pyspy_summary.py PROFILE.txt [...]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_OUR_DIRS = ("api", "qaas", "worker", "kernels")


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    return (m.group("func"), m.group("file")) if m else (frame.strip(), "")


def package_of(file: str) -> str:
    """A short owner for a source file: 'fastapi', 'asyncio', 'qaas api/jobs/reads.py', ..."""
    if not file:
        return "(native)"
    path = file.replace("\\", "/")
    if "site-packages/" in path:
        top = path.split("site-packages/", 1)[1].split("/", 1)[0]
        return top[:-3] if top.endswith(".py") else top
    try:
        rel = Path(path).resolve().relative_to(REPO).as_posix()
    except (ValueError, OSError):
        rel = None
    if rel and rel.split("/", 1)[0] in _OUR_DIRS:
        return "qaas " + rel
    m = re.search(r"/lib/python3\.\d+/(?P<mod>[^/]+)", path)
    if m:
        mod = m.group("mod")
        return mod[:-3] if mod.endswith(".py") else mod
    return path.rsplit("/", 1)[-1] or "(unknown)"


def summarize(paths: list[Path], top: int = 15) -> dict:
    self_time: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_parse(f) for f in stack.split(";") if f.strip()]
            frames = [f for f in frames if f[1]]  # drop process/thread header frames
            if not frames:
                continue
            total += n
            self_time[package_of(frames[-1][1])] += n
            seen = set()
            for func, file in frames:
                owner = package_of(file)
                if owner.startswith("qaas "):
                    seen.add(f"{owner[5:]}:{func}")
            for key in seen:
                ours[key] += n
    if not total:
        return {"samples": 0, "self_by_package": [], "inclusive_ours": []}

    def pct(counter: Counter[str]) -> list[list]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(top)]

    return {"samples": total, "self_by_package": pct(self_time), "inclusive_ours": pct(ours)}


def main() -> int:
    s = summarize([Path(p) for p in sys.argv[1:]])
    print(f"{s['samples']} samples")
    print("self time by package:", ", ".join(f"{k} {v}%" for k, v in s["self_by_package"]))
    print("inclusive, our functions:", ", ".join(f"{k} {v}%" for k, v in s["inclusive_ours"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
