"""Exceptions of cxl_pnm.

Every error the driver reports arrives as a PnmError subclass. Where the
device answered with a CXL return code (a spec code on the mailbox, or a
queue completion's status), it is in ``return_code`` (an int, e.g. 0x06 Busy,
0x7F00 the vendor Media Error) and ``return_code_name``. An error from one
device of a DeviceSet names it in ``device`` (its index) and
``device_path``.
"""

from __future__ import annotations

from typing import Optional


class PnmError(Exception):
    """A cxl-pnm device or driver error."""

    def __init__(
        self,
        message: str,
        *,
        return_code: Optional[int] = None,
        return_code_name: Optional[str] = None,
        device: Optional[int] = None,
        device_path: Optional[str] = None,
        **details: int,
    ) -> None:
        super().__init__(message)
        self.return_code = return_code
        self.return_code_name = return_code_name
        self.device = device
        self.device_path = device_path
        for name, value in details.items():
            setattr(self, name, value)


class DeviceOpenError(PnmError, OSError):
    """The path is not a ready cxl-pnm device (missing, not a device, wrong ABI, not ready)."""


class DeviceTimeoutError(PnmError, TimeoutError):
    """The device did not answer within its bound (stopped, hung or overloaded)."""


class CommandError(PnmError):
    """The device refused a command; ``return_code`` says why."""


class MediaError(PnmError):
    """A read hit poisoned or corrupted media.

    ``first_token`` and ``tokens`` name the token range, ``dpa`` the first bad
    line's device physical address. No data from those tokens was returned;
    ``skip_bad_rows=True`` scores around them instead.
    """

    first_token: int
    tokens: int
    dpa: int


class ProtocolError(PnmError):
    """The device broke the protocol (a malformed or impossible answer)."""


class InvalidRequestError(PnmError, ValueError):
    """The request was refused before it reached the device (shape, dtype, limits)."""


__all__ = [
    "PnmError",
    "DeviceOpenError",
    "DeviceTimeoutError",
    "CommandError",
    "MediaError",
    "ProtocolError",
    "InvalidRequestError",
]
