"""Type stubs of cxl_pnm._native (the Rust extension)."""

from os import PathLike
from typing import Any, Dict, List, Literal, Optional, Sequence as Seq, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

Dtype = Literal["f32", "f16", "bf16", "float32", "float16", "bfloat16"]
Aggregation = Literal["max", "mean"]
Path = Union[str, PathLike]

class Device:
    """A cxl-pnm device: a running pnm-device (its region file, or ``vfio:BDF``),
    or one embedded in this process (``Device.embedded()``)."""

    def __init__(
        self,
        path: Path,
        *,
        command_timeout: float = 10.0,
        mailbox_timeout: float = 2.0,
        interrupts: bool = False,
    ) -> None: ...
    @staticmethod
    def embedded(
        size: Union[int, str, None] = None,
        *,
        compute_units: Optional[int] = None,
        command_timeout: float = 10.0,
    ) -> "Device":
        """A device in this process; ``size`` in bytes or as text ("1GiB"), default 1 GiB."""
    @property
    def path(self) -> str: ...
    @property
    def is_embedded(self) -> bool: ...
    def identify(self) -> Dict[str, Any]:
        """Identify Memory Device (spec 4000h)."""
    def health(self) -> Dict[str, Any]:
        """Get Health Info (spec 4200h)."""
    def info(self) -> Dict[str, Any]:
        """Identify PNM: layout, compute units, dtypes, limits (max_k, max_group, max_head_dim)."""
    def inject_poison(self, dpa: int) -> None:
        """Poisons the 64-byte line at ``dpa`` (needs pnm-device --allow-injection)."""
    def clear_poison(self, dpa: int, data: bytes) -> None:
        """Clears the poison at ``dpa``, writing 64 bytes of ``data``."""
    def poison_list(self) -> Dict[str, Any]:
        """Get Poison List (spec 4300h): ``records`` of dpa, length, source."""
    def kv_create(self, layers: int, heads: int, head_dim: int, dtype: Dtype = "f16") -> "Sequence": ...
    def kv_list(self) -> List["Sequence"]: ...
    def sequence(self, id: int) -> "Sequence": ...

class DeviceSet:
    """N devices serving one KV store: pages round robin, Top-K fanned out and merged exactly."""

    def __init__(self, devices: Seq[Device]) -> None: ...
    @staticmethod
    def open(
        paths: Seq[Path],
        *,
        command_timeout: float = 10.0,
        mailbox_timeout: float = 2.0,
        interrupts: bool = False,
    ) -> "DeviceSet": ...
    @staticmethod
    def embedded(
        count: int,
        size: Union[int, str, None] = None,
        *,
        compute_units: Optional[int] = None,
        command_timeout: float = 10.0,
    ) -> "DeviceSet": ...
    def __len__(self) -> int: ...
    def kv_create(self, layers: int, heads: int, head_dim: int, dtype: Dtype = "f16") -> "Sequence": ...
    def sequence(self, ids: Seq[int]) -> "Sequence": ...

class TopK:
    """A Top-K answer, best first."""

    indices: npt.NDArray[np.uint32]
    scores: npt.NDArray[np.float32]
    #: [n, head_dim] in the sequence's dtype (bf16 as uint16 bits); None from ``topk``.
    keys: Optional[np.ndarray]
    values: Optional[np.ndarray]
    tokens: int
    tokens_scored: int
    skipped: int
    device_ns: int
    model_ns: int
    def __len__(self) -> int: ...

class Sequence:
    """A KV sequence in device DRAM (one device, or sharded over a DeviceSet)."""

    @property
    def id(self) -> int: ...
    @property
    def ids(self) -> List[int]: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def devices(self) -> int: ...
    def __len__(self) -> int: ...
    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Appends ``[layers, heads, tokens, head_dim]`` K and V rows, atomically.

        The sequence's own dtype (f32: float32; f16: float16 or uint16 bits;
        bf16: uint16 bits), C-contiguous, goes to the device without a copy
        (keys in 16-token tiles through one tile-sized buffer); other float
        arrays are converted first."""
    def topk(
        self,
        layer: int,
        head: int,
        queries: np.ndarray,
        k: int,
        *,
        aggregation: Aggregation = "max",
        budget: Optional[int] = None,
        sink_pages: int = 1,
        recent_pages: int = 1,
        skip_bad_rows: bool = False,
    ) -> TopK: ...
    def topk_gather(
        self,
        layer: int,
        head: int,
        queries: np.ndarray,
        k: int,
        *,
        aggregation: Aggregation = "max",
        budget: Optional[int] = None,
        sink_pages: int = 1,
        recent_pages: int = 1,
        skip_bad_rows: bool = False,
    ) -> TopK: ...
    def gather(self, layer: int, head: int, indices: Seq[int]) -> Tuple[np.ndarray, np.ndarray]: ...
    def row_ranges(
        self, layer: int, head: int, start: int, stop: int, *, value: bool = False
    ) -> List[Tuple[int, int]]: ...
    def refresh(self) -> None: ...
    def free(self) -> None: ...

class TieredKv:
    """Sinks and a hot window in host memory, older tokens on the device(s)."""

    def __init__(
        self,
        devices: Union[Device, DeviceSet],
        layers: int,
        heads: int,
        head_dim: int,
        *,
        dtype: Dtype = "f32",
        hot_window: int,
        k: int,
        sinks: int = 4,
        evict_batch: int = 0,
    ) -> None: ...
    def append(self, keys: np.ndarray, values: np.ndarray) -> None: ...
    def retry_eviction(self) -> None: ...
    def attend(
        self, layer: int, head: int, queries: npt.NDArray[np.float32]
    ) -> Tuple[npt.NDArray[np.float32], Dict[str, Any]]: ...
    def attend_layer(
        self, layer: int, queries: npt.NDArray[np.float32]
    ) -> Tuple[npt.NDArray[np.float32], int]: ...
    def recall(self, layer: int, head: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]: ...
    @property
    def tokens(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    @property
    def host_tokens(self) -> int: ...
    @property
    def evicted_bytes(self) -> int: ...
    @property
    def k(self) -> int: ...
    def free(self) -> None: ...

def memory_read_gbps(bytes: int = ..., reps: int = 5) -> float:
    """This machine's memory read bandwidth (GB/s), the benchmarks' roofline."""

def _bench_rust_topk_gather(
    seq: Sequence, layer: int, head: int, queries: np.ndarray, k: int, reps: int
) -> List[float]: ...
def _bench_rust_append(seq: Sequence, keys: np.ndarray, values: np.ndarray) -> float: ...
def accuracy_report(
    keys: np.ndarray,
    values: np.ndarray,
    queries: Optional[npt.NDArray[np.float32]] = None,
    *,
    dtype: Optional[Dtype] = None,
    ks: Seq[int] = (16, 64, 256, 1024, 4096),
    budgets: Seq[int] = (2048, 8192),
    group: int = 4,
    samples: int = 4,
    sink_pages: int = 1,
    recent_pages: int = 1,
    seed: int = 1,
    device: Optional[Device] = None,
    plot_dir: Optional[Path] = None,
    per_head: bool = False,
) -> Dict[str, Any]:
    """The accuracy report on your KV cache (see cxl_pnm.accuracy)."""

def synthetic_accuracy_report(
    kind: Literal["structured", "random"] = "structured",
    *,
    layers: int = 2,
    heads: int = 4,
    head_dim: int = 128,
    tokens: int = 32768,
    dtype: Dtype = "f16",
    ks: Seq[int] = (16, 64, 256, 1024, 4096),
    budgets: Seq[int] = (2048, 8192),
    group: int = 4,
    samples: int = 4,
    sink_pages: int = 1,
    recent_pages: int = 1,
    seed: int = 1,
    device: Optional[Device] = None,
    plot_dir: Optional[Path] = None,
    per_head: bool = False,
) -> Dict[str, Any]:
    """The accuracy report on a synthetic cache (see cxl_pnm.accuracy)."""
