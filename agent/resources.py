"""What this node offers: CPU cores, memory and GPUs, detected for real, and the labels and
address details that describe them to the scheduler.

``TETHER_FAKE_GPUS`` (the agent config's ``fake_gpus``) is a test-only setting that replaces
GPU detection: ``2`` pretends two 16 GiB "Fake GPU" devices, ``a100:40Gi,a100:40Gi`` two
devices of that model and memory (so ``tether.io/gpu-model=a100``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

from tether.api.v1 import types_pb2
from tether.sdk.quantities import format_memory, parse_memory

__all__ = [
    "GPU_MEMORY_LABEL",
    "GPU_MODEL_LABEL",
    "detect_cpu",
    "detect_gpus",
    "detect_memory",
    "free_port",
    "gpu_labels",
    "gpu_model_label",
]

GPU_MODEL_LABEL = "tether.io/gpu-model"
GPU_MEMORY_LABEL = "tether.io/gpu-memory"
_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "radeon", "instinct"}


def gpu_model_label(model: str) -> str:
    """A short, selector-friendly model name: ``NVIDIA A100-SXM4-80GB`` -> ``a100``,
    ``NVIDIA GeForce RTX 4090`` -> ``rtx-4090``; empty for an empty model."""
    words = [w for w in re.split(r"[\s_-]+", model.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return ""
    if words[0] in ("rtx", "gtx") and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    return words[0]


def gpu_labels(gpus: list[types_pb2.Gpu]) -> dict[str, str]:
    """The labels an agent reports for its GPUs (those of the first device; none without
    GPUs): ``tether.io/gpu-model`` (see :func:`gpu_model_label`) and
    ``tether.io/gpu-memory`` (one device's memory, e.g. ``80Gi``)."""
    if not gpus:
        return {}
    out = {}
    if model := gpu_model_label(gpus[0].model):
        out[GPU_MODEL_LABEL] = model
    if gpus[0].memory_bytes:
        out[GPU_MEMORY_LABEL] = format_memory(gpus[0].memory_bytes)
    return out


def free_port() -> int:
    """A TCP port nothing listens on now (0 when none could be found), for a gang's master."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]
    except OSError:
        return 0


def detect_cpu() -> float:
    """Cores this process may use: cgroup quota if set, else the affinity mask."""
    cores = (
        float(len(os.sched_getaffinity(0)))
        if hasattr(os, "sched_getaffinity")
        else float(os.cpu_count() or 1)
    )
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def detect_memory() -> int:
    """Bytes of memory: the cgroup limit if set, else physical memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def detect_gpus(fake: str = "") -> list[types_pb2.Gpu]:
    """GPUs via NVML, then ``nvidia-smi``; ``fake`` (test-only) replaces detection."""
    if fake:
        return _fake(fake)
    gpus = _nvml()
    if gpus is not None:
        return gpus
    return _nvidia_smi()


def _fake(spec: str) -> list[types_pb2.Gpu]:
    if spec.isdigit():
        return [
            types_pb2.Gpu(index=i, uuid=f"GPU-fake-{i}", model="Fake GPU", memory_bytes=16 * 2**30)
            for i in range(int(spec))
        ]
    out = []
    for i, item in enumerate(x for x in spec.split(",") if x):
        model, _, mem = item.partition(":")
        out.append(
            types_pb2.Gpu(
                index=i,
                uuid=f"GPU-fake-{i}",
                model=model or "Fake GPU",
                memory_bytes=parse_memory(mem) if mem else 0,
            )
        )
    return out


def _nvml() -> list[types_pb2.Gpu] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: no GPUs
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out.append(
                types_pb2.Gpu(
                    index=i,
                    uuid=uuid if isinstance(uuid, str) else uuid.decode(),
                    model=name if isinstance(name, str) else name.decode(),
                    memory_bytes=pynvml.nvmlDeviceGetMemoryInfo(h).total,
                )
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> list[types_pb2.Gpu]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        res = subprocess.run(
            [exe, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            mem = int(parts[3]) * 2**20 if parts[3].isdigit() else 0
            out.append(
                types_pb2.Gpu(index=int(parts[0]), uuid=parts[1], model=parts[2], memory_bytes=mem)
            )
    return out
