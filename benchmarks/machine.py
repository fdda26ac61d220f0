"""What every benchmark records about the machine it ran on, and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Versions, CPU model and count, memory, plus whatever the benchmark adds (e.g. grpcio)."""
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "mem_total": _proc_field("/proc/meminfo", "MemTotal"),
        "cuda_available": torch.cuda.is_available(),
        **extra,
    }


def write_results(path: Path, doc: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
