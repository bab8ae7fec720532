"""Which device a node computes on: the CPU, or a GPU (Apple's Metal, or NVIDIA's CUDA with ``mlx[cuda]``).

``--device`` picks one (default: the best available); ``--gpu N`` pins a node to one GPU of several so
that several nodes can share a host. MLX's CUDA backend computes on the first visible GPU, so pinning is
done with ``CUDA_VISIBLE_DEVICES``, which must be set before CUDA starts: the CLI re-executes itself with
it (see :func:`exo_stable.engine.platform.reexec_env`).
"""

from __future__ import annotations

import enum
import functools

import mlx.core as mx


class DeviceKind(enum.StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class DeviceUnavailable(RuntimeError):
    """``--device gpu`` on a machine where MLX sees no GPU."""


def gpu_count() -> int:
    return int(mx.device_count(mx.gpu))


@functools.cache
def gpu_backend() -> str | None:
    """``cuda``, ``metal``, or None when this MLX build sees no GPU."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def resolve(choice: str | None) -> DeviceKind:
    """The device to use: ``choice`` when given (checked), else the GPU when there is one."""
    kind = DeviceKind(choice) if choice else (DeviceKind.GPU if gpu_backend() else DeviceKind.CPU)
    if kind is DeviceKind.GPU and gpu_backend() is None:
        raise DeviceUnavailable(
            "--device gpu: this MLX build sees no GPU (on Linux with an NVIDIA GPU: pip install 'exo-stable[cuda]')"
        )
    return kind


_CHOSEN: list[DeviceKind] = []
"""The device this process computes on, once the CLI has chosen it (one process, one device)."""


def choose(kind: DeviceKind) -> None:
    """Set the device this process computes on (the CLI does, from ``--device``)."""
    _CHOSEN[:] = [kind]


def chosen() -> DeviceKind:
    """The device chosen for this process, or the best available when none was."""
    return _CHOSEN[0] if _CHOSEN else resolve(None)


def activate(kind: DeviceKind) -> None:
    """Make ``kind`` the default device. Call on the MLX thread before building a model."""
    mx.set_default_device(mx.gpu if kind is DeviceKind.GPU else mx.cpu)


def on_cuda() -> bool:
    """True when the default device is a CUDA GPU (quantized weights then compute in bfloat16)."""
    return mx.default_device() == mx.gpu and gpu_backend() == "cuda"


def describe(kind: DeviceKind) -> str:
    if kind is DeviceKind.CPU:
        return "cpu"
    backend = gpu_backend() or "gpu"
    info = mx.device_info() if backend != "cpu" else {}
    name = info.get("device_name") or info.get("architecture") or ""
    return f"gpu ({backend}{', ' + str(name) if name else ''})"
