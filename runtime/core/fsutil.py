"""Atomic publication of output directories.

Everything is written into a temporary directory beside the target (same filesystem, so the
final `rename` is atomic); a run killed at any point leaves only a `.NAME.tmp-*` directory,
never a target that looks complete. An existing target is replaced only with `force`.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from .errors import OutputExistsError


def publish_dir(target: Path, write: Callable[[Path], None], *, force: bool = False) -> Path:
    target = Path(target)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to replace it, or choose another output")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def human_bytes(n: float) -> str:
    """A size with a unit that fits: 512 B, 3.4 MB, 145.2 GB (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
