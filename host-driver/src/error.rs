//! The driver's errors.

use std::path::PathBuf;
use std::time::Duration;

use pnm_protocol::{Opcode, ReturnCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message, not a `source`: an error chain
    // printed whole would say it twice.
    #[error("cannot open {path}: {error}")]
    Open { path: PathBuf, error: std::io::Error },
    #[error("{path} is not a cxl-pnm device: {reason}")]
    NotADevice { path: PathBuf, reason: String },
    #[error("{path} speaks ABI {found_major}.{found_minor}; this driver speaks {expected_major}.x")]
    AbiMismatch { path: PathBuf, found_major: u16, found_minor: u16, expected_major: u16 },
    #[error("device at {path} is not ready (memory device status {status:#x}: {reason})")]
    NotReady { path: PathBuf, status: u64, reason: &'static str },
    #[error(
        "mailbox busy: the doorbell stayed set (a command that never completed, or a client that ignores the Mailbox Lock)"
    )]
    MailboxBusy,
    #[error("the Mailbox Lock stayed held by pid {holder_pid} for {waited:?}")]
    MailboxLockTimeout { holder_pid: u32, waited: Duration },
    #[error(
        "{opcode}: the device broke this host's Mailbox Lock (held past its lease); the answer may be another host's and was discarded"
    )]
    MailboxLockLost { opcode: Opcode },
    #[error(
        "{opcode} did not complete within {waited:?}{}",
        if *heartbeat_stopped { " and the device heartbeat stopped: the device is likely dead" } else { "" }
    )]
    Timeout { opcode: Opcode, waited: Duration, heartbeat_stopped: bool },
    #[error("{opcode} failed: {code}")]
    Command { opcode: Opcode, code: ReturnCode },
    #[error("{opcode}: input of {len} bytes exceeds the {max}-byte mailbox payload")]
    InputTooLarge { opcode: Opcode, len: usize, max: u64 },
    #[error("device answered {opcode} with malformed output: {reason}")]
    MalformedOutput { opcode: Opcode, reason: String },
    #[error("device reset did not complete within {0:?}")]
    ResetTimeout(Duration),
    #[error("{command} failed on the device: {code}{}", queue_hint(*code))]
    Queue { command: &'static str, code: ReturnCode },
    #[error(
        "{command} read bad media: {tokens} tokens from token {first_token} lie on poisoned or \
         corrupted lines (first at DPA {dpa:#x}); no data from them was returned"
    )]
    MediaError { command: &'static str, first_token: u64, tokens: u64, dpa: u64 },
    #[error("{command} (command id {command_id}) did not complete within {waited:?}")]
    QueueTimeout { command: &'static str, command_id: u16, waited: Duration },
    #[error(
        "{command} did not complete within {waited:?}; its queue pair was replaced, so it will \
         not complete now, but it may have taken effect: read the state back before retrying"
    )]
    Unconfirmed { command: &'static str, waited: Duration },
    #[error("queue full: {0} commands in flight")]
    QueueFull(u32),
    #[error("device broke the queue protocol: {0}")]
    Protocol(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("device {device} of the set ({path}): {error}")]
    Member { device: usize, path: PathBuf, error: Box<Error> },
    #[error("PCI device {device}: {problem}")]
    Vfio { device: String, problem: VfioProblem },
}

/// Why a PCI device could not be driven through VFIO.
#[derive(Debug, thiserror::Error)]
pub enum VfioProblem {
    #[error("no such PCI device (looked in /sys/bus/pci/devices)")]
    NoSuchDevice,
    #[error(
        "it is in no IOMMU group: VFIO needs an IOMMU (in a QEMU guest: -device \
         intel-iommu,intremap=on and intel_iommu=on on the kernel command line)"
    )]
    NoIommuGroup,
    #[error(
        "it is bound to {}, not vfio-pci (echo vfio-pci > .../driver_override; \
         echo BDF > /sys/bus/pci/drivers_probe)",
        driver.as_deref().unwrap_or("no driver")
    )]
    NotBoundToVfioPci { driver: Option<String> },
    #[error("VFIO: {0}")]
    Vfio(String),
    #[error("BAR{index} is {size} bytes; {expected}")]
    Bar { index: u32, size: u64, expected: &'static str },
    #[error("mapping BAR2: {0}")]
    Map(std::io::Error),
    #[error("MSI-X: {0}")]
    Interrupts(String),
}

impl Error {
    /// True for errors that say the device did not answer in time (it may
    /// be stopped, hung or overloaded): another command would likely wait
    /// out its timeout too.
    pub fn device_unresponsive(&self) -> bool {
        if let Self::Member { error, .. } = self {
            return error.device_unresponsive();
        }
        matches!(
            self,
            Self::Timeout { .. }
                | Self::QueueTimeout { .. }
                | Self::Unconfirmed { .. }
                | Self::MailboxBusy
                | Self::MailboxLockTimeout { .. }
        )
    }

    /// The spec return code, if the device answered with one.
    pub fn return_code(&self) -> Option<ReturnCode> {
        match self {
            Self::Command { code, .. } | Self::Queue { code, .. } => Some(*code),
            Self::MediaError { .. } => Some(ReturnCode::MEDIA_ERROR),
            Self::Member { error, .. } => error.return_code(),
            _ => None,
        }
    }
}

/// What a queue command's return code means, for the error message.
fn queue_hint(code: ReturnCode) -> &'static str {
    match code {
        ReturnCode::INVALID_HANDLE => " (no such sequence)",
        ReturnCode::RESOURCES_EXHAUSTED => " (device DRAM or the sequence table is full)",
        ReturnCode::INVALID_PHYSICAL_ADDRESS => " (a buffer lies outside the host DMA window)",
        ReturnCode::INVALID_PAYLOAD_LENGTH => " (a buffer is too small for the command)",
        ReturnCode::BUSY => " (another writer's append to this sequence is in progress)",
        _ => "",
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
