"""Line-per-request JSON inputs (calibration data, benchmark workloads): one reader, one error style.

Every problem in the file is collected before anything is refused, so one run of the command lists
all broken lines and missing images instead of the first of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def line_list(nums: list[int]) -> str:
    return ", ".join(str(n) for n in nums[:20]) + (" …" if len(nums) > 20 else "")


def parse_jsonl(path: Path, parse_row: Callable[[dict, Callable[[str], Path]], T],
                what: str) -> tuple[list[tuple[int, T]], list[str]]:
    """(line number, parse_row(row, image_path)) for every non-empty line, and the problems found.

    `parse_row` raises KeyError, TypeError or ValueError for a row that is not `what` (e.g. 'JSON
    objects with a non-empty "prompt"'); `image_path(name)` resolves an image relative to the file
    and records it when it does not exist.
    """
    items, broken, missing = [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue

        def image_path(name: str, n: int = n) -> Path:
            p = Path(name) if Path(name).is_absolute() else path.parent / name
            if not p.is_file():
                missing.append(f"line {n}: {p}")
            return p

        try:
            items.append((n, parse_row(json.loads(line), image_path)))
        except (KeyError, TypeError, ValueError):  # json.JSONDecodeError is a ValueError
            broken.append(n)
    problems = [f"lines {line_list(broken)} are not {what}"] if broken else []
    problems += [f"images not found: {'; '.join(missing[:10])}"] if missing else []
    return items, problems
