"""cxl-pnm for Python: an emulated CXL processing-near-memory device for LLM KV caches.

The KV cache lives in device DRAM; a decode step sends the query to the
device, which scores every key next to its memory and returns only the
Top-K tokens (and their K and V rows).

    >>> import numpy as np, cxl_pnm
    >>> dev = cxl_pnm.Device.embedded("256MiB")           # or Device("/dev/shm/cxl-pnm0")
    >>> seq = dev.kv_create(layers=1, heads=2, head_dim=64, dtype="f16")
    >>> k = np.random.randn(1, 2, 1000, 64).astype(np.float16)
    >>> seq.append(k, k)                                  # straight into device DRAM
    >>> top = seq.topk_gather(0, 1, np.ones((4, 64), np.float32), k=16)
    >>> top.indices.shape, top.keys.shape
    ((16,), (16, 64))

Classes: Device, DeviceSet (sequences sharded over several devices),
Sequence, TopK, TieredKv (hot window in host memory, the rest on the
device, and a decode step's attention over both). Errors: cxl_pnm.errors.
The Hugging Face attention hook: cxl_pnm.hf. The accuracy report:
cxl_pnm.accuracy.
"""

from . import accuracy, errors
from ._native import (
    Device,
    DeviceSet,
    Sequence,
    TieredKv,
    TopK,
    __version__,
    memory_read_gbps,
)
from .errors import (
    CommandError,
    DeviceOpenError,
    DeviceTimeoutError,
    InvalidRequestError,
    MediaError,
    PnmError,
    ProtocolError,
)

__all__ = [
    "Device",
    "DeviceSet",
    "Sequence",
    "TieredKv",
    "TopK",
    "memory_read_gbps",
    "accuracy",
    "errors",
    "PnmError",
    "DeviceOpenError",
    "DeviceTimeoutError",
    "CommandError",
    "MediaError",
    "ProtocolError",
    "InvalidRequestError",
    "__version__",
]
