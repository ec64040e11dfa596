"""Preflight: the host's RAM and disk against what the build needs (runtime/core/build_host.py), before any
heavy work; a refusal is one line (exit 2) that names the remedies. `--no-preflight` overrides it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from runtime.core.build_host import HostNeeds, llm_need
from runtime.core.config import NVLMConfig
from runtime.core.errors import NVLMError
from runtime.core.fsutil import human_bytes
from runtime.core.llm_formats import LLMFormat

MARGIN = 1.10  # refuse unless the host has this much more than the estimate (RAM and disk)


class PreflightError(NVLMError):
    """This host cannot run the build as asked."""


# --------------------------------------------------------------------------- the host


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def remedies_for(cfg: NVLMConfig, fmt: LLMFormat, needs: HostNeeds, *, fidelity: bool, largest_tensor: int) -> list[str]:
    """What would make a refused build fit, in the order a user would try them."""
    out = [f"a host with at least {human_bytes(needs.peak_ram * MARGIN)} of RAM available"]
    if not fmt.quantized and fidelity:
        streamed = llm_need(cfg, fmt, fidelity=False, largest_tensor=largest_tensor)
        out.append(f"`nvlm-build llm --quant {fmt.name} --no-fidelity` converts the decoder a tensor at a time "
                   f"(≈ {human_bytes(streamed.ram)})")
    if (fidelity or fmt.quantized) and "layer at a time" not in needs.peak_stage.why:
        lw = llm_need(cfg, fmt, fidelity=fidelity, largest_tensor=largest_tensor, layerwise=True)
        out.append(f"--layerwise on runs calibration and the fidelity report a decoder layer at a time "
                   f"(≈ {human_bytes(lw.ram)} for this stage)")
    return out


def check(needs: HostNeeds, out: Path, *, command: str, remedies: list[str]) -> None:
    """Refuse (PreflightError) when the host has less RAM or disk than the build needs."""
    ram, disk = available_ram(), free_disk(Path(out).parent)
    problems = []
    if needs.peak_ram * MARGIN > ram:
        peak = needs.peak_stage
        problems.append(f"it needs about {human_bytes(needs.peak_ram)} of RAM at its peak ({peak.stage}: {peak.why}) "
                        f"and this host has {human_bytes(ram)} available")
    if needs.disk * MARGIN > disk:
        problems.append(f"it writes about {human_bytes(needs.disk)} and {human_bytes(disk)} are free under "
                        f"{Path(out).parent}")
    if problems:
        raise PreflightError(f"{command} would not finish on this host: {'; '.join(problems)}. Remedies: "
                             + "; ".join(remedies + ["--no-preflight to try anyway"]))
