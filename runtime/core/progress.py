"""Progress bars for steps that can take minutes on a real checkpoint (hashing ~150 GB of shards,
calibration, the ONNX export, the fidelity runs, the streaming conversion).

tqdm on stderr, shown only when stderr is a terminal (tqdm's `disable=None`) and not silenced: a CLI
that prints machine-readable output (`--json`) calls `silence()`. Without tqdm (it comes with
transformers) the steps run without bars.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_silenced = False


def silence(on: bool = True) -> None:
    """No bars from here on (e.g. `--json`, whose stdout a program reads; bars go to stderr anyway)."""
    global _silenced
    _silenced = on


def _tqdm(**kw):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(disable=True if _silenced else None, leave=False, dynamic_ncols=True, **kw)


@contextmanager
def bar(total: float | None, desc: str, unit: str = "it", unit_scale: bool = False) -> Iterator:
    """`with bar(n, "hashing") as advance: … advance(k)`."""
    b = _tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale)
    try:
        yield (lambda n=1: None) if b is None else b.update
    finally:
        if b is not None:
            b.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate `items` with a bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, unit) as advance:
        for x in items:
            yield x
            advance(1)
