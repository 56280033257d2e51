"""Fixtures: an embedded device, and a separate `pnm-device` process.

The process fixture runs the workspace's `pnm-device` binary: $PNM_DEVICE_BIN,
else target/{debug,release}/pnm-device (built with cargo if neither exists).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import cxl_pnm

WORKSPACE = Path(__file__).resolve().parents[2]


def device_binary() -> Path:
    explicit = os.environ.get("PNM_DEVICE_BIN")
    if explicit:
        return Path(explicit)
    for profile in ("debug", "release"):
        candidate = WORKSPACE / "target" / profile / "pnm-device"
        if candidate.exists():
            return candidate
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("no pnm-device binary and no cargo to build it")
    subprocess.run([cargo, "build", "--quiet", "-p", "pnm-device"], cwd=WORKSPACE, check=True)
    return WORKSPACE / "target" / "debug" / "pnm-device"


class DeviceProcess:
    """A pnm-device process on a fresh region, stopped (SIGTERM, then SIGKILL) on close."""

    def __init__(self, *extra: str, size: str = "256MiB") -> None:
        self.path = Path(f"/dev/shm/cxl-pnm-pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        env = dict(os.environ, RUST_LOG=os.environ.get("PNM_TEST_DEVICE_LOG", "error"))
        self.process = subprocess.Popen(
            [str(device_binary()), "--path", str(self.path), "--size", size, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                cxl_pnm.Device(self.path, command_timeout=2.0)
                break
            except cxl_pnm.PnmError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"pnm-device exited early with {self.process.returncode}")
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"pnm-device on {self.path} was not ready within 10 s")
                time.sleep(0.01)

    def open(self, **options) -> cxl_pnm.Device:
        return cxl_pnm.Device(self.path, **options)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for leftover in (self.path, Path(str(self.path) + ".sock")):
            leftover.unlink(missing_ok=True)


@pytest.fixture
def device_process():
    process = DeviceProcess()
    yield process
    process.close()


@pytest.fixture(params=["embedded", "process"])
def device_kind(request):
    return request.param


@pytest.fixture
def _device_under_test(request, device_kind):
    if device_kind == "embedded":
        yield None
    else:
        process = DeviceProcess()
        yield process
        # pytest holds fixture values until the whole teardown is done: let
        # the handle go (it gives its queue pair back) while the device runs.
        request.node.funcargs.pop("device", None)
        gc.collect()
        process.close()


@pytest.fixture
def device(device_kind, _device_under_test):
    """The same tests against an embedded device and a separate process."""
    if device_kind == "embedded":
        return cxl_pnm.Device.embedded("256MiB")
    return _device_under_test.open()
