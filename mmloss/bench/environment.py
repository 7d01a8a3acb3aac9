"""What the numbers were measured on: device, versions, threads, memory settings, load."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Optional

import torch

import mmloss


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device, malloc_setting: str) -> dict:
    """A flat, JSON-ready description of the machine and software stack."""
    info = {
        "mmloss": mmloss.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "malloc": malloc_setting,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"sm_{props.major}{props.minor}"
    return info


def header_lines(info: dict) -> list:
    """Three lines: software stack, device, platform."""
    stack = (f"mmloss {info['mmloss']} · torch {info['torch']} · triton {info['triton'] or 'not installed'}"
             f" · Python {info['python']} · CUDA {info['cuda'] or 'none (CPU build of torch)'}")
    if "gpu" in info:
        device = (f"{info['device']}: {info['gpu']} ({info['gpu_capability']}, {info['gpu_memory_gib']} GiB)"
                  f" · host CPU {info['cpu']}")
    else:
        device = (f"cpu: {info['cpu']} · {info['cpu_count']} logical CPUs · torch threads {info['torch_threads']}"
                  + (f" (OMP_NUM_THREADS={info['omp_num_threads']})" if info["omp_num_threads"] else ""))
    load = info["load_average_at_start"]
    if load:
        device += f" · load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    return [stack, device, info["platform"]]
