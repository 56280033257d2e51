//! Mailbox commands: opcodes, return codes and payload layouts
//! (CXL 3.1 §8.2.9, tables 8-34 onward), plus the vendor PNM commands.
//!
//! Opcodes and return codes are open newtypes, as on the wire: a value this
//! crate does not name is still representable, and is answered or reported,
//! never trusted.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A mailbox command opcode: [15:8] command set, [7:0] command.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Opcode(pub u16);

impl Opcode {
    pub const GET_EVENT_RECORDS: Self = Self(0x0100);
    pub const CLEAR_EVENT_RECORDS: Self = Self(0x0101);
    pub const GET_EVENT_INTERRUPT_POLICY: Self = Self(0x0102);
    pub const SET_EVENT_INTERRUPT_POLICY: Self = Self(0x0103);
    pub const GET_TIMESTAMP: Self = Self(0x0300);
    pub const SET_TIMESTAMP: Self = Self(0x0301);
    pub const GET_SUPPORTED_LOGS: Self = Self(0x0400);
    pub const GET_LOG: Self = Self(0x0401);
    pub const IDENTIFY_MEMORY_DEVICE: Self = Self(0x4000);
    pub const GET_HEALTH_INFO: Self = Self(0x4200);
    pub const GET_POISON_LIST: Self = Self(0x4300);
    /// Served only by a device started with `--allow-injection`.
    pub const INJECT_POISON: Self = Self(0x4301);
    pub const CLEAR_POISON: Self = Self(0x4302);
    pub const GET_SCAN_MEDIA_CAPABILITIES: Self = Self(0x4303);
    /// A background command.
    pub const SCAN_MEDIA: Self = Self(0x4304);
    pub const GET_SCAN_MEDIA_RESULTS: Self = Self(0x4305);
    /// Vendor: the PNM capability's facts and the firmware's limits.
    pub const IDENTIFY_PNM: Self = Self(0xC000);
    /// Vendor: create a submission/completion queue pair.
    pub const CREATE_QUEUE_PAIR: Self = Self(0xC001);
    /// Vendor: delete a queue pair.
    pub const DELETE_QUEUE_PAIR: Self = Self(0xC002);
    /// Vendor: allocate a buffer in the host DMA window.
    pub const ALLOCATE_DMA: Self = Self(0xC003);
    /// Vendor: free a buffer in the host DMA window.
    pub const FREE_DMA: Self = Self(0xC004);
    /// Vendor, fault injection: add an event record to a log. Served only
    /// by a device started with `--allow-injection` (else Unsupported, and
    /// absent from the CEL).
    pub const INJECT_EVENT: Self = Self(0xC005);
    /// Vendor, fault injection: poison or silently corrupt a DPA range.
    /// Served only with `--allow-injection`, like Inject Event Record.
    pub const INJECT_MEDIA_FAULT: Self = Self(0xC006);
    /// Vendor, fault injection: doorbells, completions, hangs, compute
    /// units, the heartbeat, an abort, slow memory (`--allow-injection`).
    pub const INJECT_DEVICE_FAULT: Self = Self(0xC007);

    /// The fault injection commands: served, and in the CEL, only by a
    /// device started with `--allow-injection`.
    pub const INJECTION: [Self; 4] = [
        Self::INJECT_POISON,
        Self::INJECT_EVENT,
        Self::INJECT_MEDIA_FAULT,
        Self::INJECT_DEVICE_FAULT,
    ];

    /// Every opcode this crate names, in Command Effects Log order.
    pub const ALL: [Self; 24] = [
        Self::GET_EVENT_RECORDS,
        Self::CLEAR_EVENT_RECORDS,
        Self::GET_EVENT_INTERRUPT_POLICY,
        Self::SET_EVENT_INTERRUPT_POLICY,
        Self::GET_TIMESTAMP,
        Self::SET_TIMESTAMP,
        Self::GET_SUPPORTED_LOGS,
        Self::GET_LOG,
        Self::IDENTIFY_MEMORY_DEVICE,
        Self::GET_HEALTH_INFO,
        Self::GET_POISON_LIST,
        Self::INJECT_POISON,
        Self::CLEAR_POISON,
        Self::GET_SCAN_MEDIA_CAPABILITIES,
        Self::SCAN_MEDIA,
        Self::GET_SCAN_MEDIA_RESULTS,
        Self::IDENTIFY_PNM,
        Self::CREATE_QUEUE_PAIR,
        Self::DELETE_QUEUE_PAIR,
        Self::ALLOCATE_DMA,
        Self::FREE_DMA,
        Self::INJECT_EVENT,
        Self::INJECT_MEDIA_FAULT,
        Self::INJECT_DEVICE_FAULT,
    ];

    /// The spec's name of the command, if this crate knows it.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::GET_EVENT_RECORDS => "Get Event Records",
            Self::CLEAR_EVENT_RECORDS => "Clear Event Records",
            Self::GET_EVENT_INTERRUPT_POLICY => "Get Event Interrupt Policy",
            Self::SET_EVENT_INTERRUPT_POLICY => "Set Event Interrupt Policy",
            Self::GET_TIMESTAMP => "Get Timestamp",
            Self::SET_TIMESTAMP => "Set Timestamp",
            Self::GET_SUPPORTED_LOGS => "Get Supported Logs",
            Self::GET_LOG => "Get Log",
            Self::IDENTIFY_MEMORY_DEVICE => "Identify Memory Device",
            Self::GET_HEALTH_INFO => "Get Health Info",
            Self::GET_POISON_LIST => "Get Poison List",
            Self::INJECT_POISON => "Inject Poison",
            Self::CLEAR_POISON => "Clear Poison",
            Self::GET_SCAN_MEDIA_CAPABILITIES => "Get Scan Media Capabilities",
            Self::SCAN_MEDIA => "Scan Media",
            Self::GET_SCAN_MEDIA_RESULTS => "Get Scan Media Results",
            Self::IDENTIFY_PNM => "Identify PNM",
            Self::CREATE_QUEUE_PAIR => "Create Queue Pair",
            Self::DELETE_QUEUE_PAIR => "Delete Queue Pair",
            Self::ALLOCATE_DMA => "Allocate DMA",
            Self::FREE_DMA => "Free DMA",
            Self::INJECT_EVENT => "Inject Event Record",
            Self::INJECT_MEDIA_FAULT => "Inject Media Fault",
            Self::INJECT_DEVICE_FAULT => "Inject Device Fault",
            _ => return None,
        })
    }

    /// True for the vendor-specific range C000h-FFFFh.
    pub fn is_vendor(self) -> bool {
        self.0 >= 0xC000
    }

    /// Input payload length the command takes.
    pub fn input_len(self) -> Option<InputLen> {
        if self == Self::SET_EVENT_INTERRUPT_POLICY {
            // The fifth byte, Dynamic Capacity, is optional.
            return Some(InputLen::Between(4, 5));
        }
        if self == Self::CLEAR_EVENT_RECORDS {
            return Some(InputLen::PerItem {
                header: size_of::<crate::events::ClearEventRecordsHeader>(),
                item: 2,
                max_items: crate::events::MAX_CLEAR_HANDLES,
            });
        }
        Some(InputLen::Exact(match self {
            Self::GET_EVENT_RECORDS => 1,
            Self::INJECT_EVENT => size_of::<crate::events::InjectEventInput>(),
            Self::GET_POISON_LIST | Self::GET_SCAN_MEDIA_CAPABILITIES => {
                size_of::<crate::media::DpaRange>()
            }
            Self::INJECT_POISON => size_of::<crate::media::InjectPoisonInput>(),
            Self::CLEAR_POISON => size_of::<crate::media::ClearPoisonInput>(),
            Self::SCAN_MEDIA => size_of::<crate::media::ScanMediaInput>(),
            Self::INJECT_MEDIA_FAULT => size_of::<crate::media::InjectMediaFaultInput>(),
            Self::INJECT_DEVICE_FAULT => size_of::<crate::faults::InjectDeviceFaultInput>(),
            Self::SET_TIMESTAMP => size_of::<SetTimestampInput>(),
            Self::GET_LOG => size_of::<GetLogInput>(),
            Self::CREATE_QUEUE_PAIR => size_of::<CreateQueuePairInput>(),
            Self::DELETE_QUEUE_PAIR => size_of::<DeleteQueuePairInput>(),
            Self::ALLOCATE_DMA => size_of::<AllocateDmaInput>(),
            Self::FREE_DMA => size_of::<FreeDmaInput>(),
            Self::GET_TIMESTAMP
            | Self::GET_SUPPORTED_LOGS
            | Self::IDENTIFY_MEMORY_DEVICE
            | Self::GET_HEALTH_INFO
            | Self::GET_SCAN_MEDIA_RESULTS
            | Self::IDENTIFY_PNM
            | Self::GET_EVENT_INTERRUPT_POLICY => 0,
            _ => return None,
        }))
    }
}

/// The input lengths a command takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLen {
    Exact(usize),
    /// Any length from the first to the second, both included.
    Between(usize, usize),
    /// A fixed header, then up to `max_items` items of `item` bytes (the
    /// header says how many; the command checks that).
    PerItem {
        header: usize,
        item: usize,
        max_items: usize,
    },
}

impl InputLen {
    pub fn accepts(self, len: usize) -> bool {
        match self {
            Self::Exact(n) => len == n,
            Self::Between(min, max) => (min..=max).contains(&len),
            Self::PerItem { header, item, max_items } => {
                len >= header
                    && (len - header).is_multiple_of(item)
                    && (len - header) / item <= max_items
            }
        }
    }

    /// The shortest input it takes.
    pub fn min(self) -> usize {
        match self {
            Self::Exact(n) | Self::Between(n, _) => n,
            Self::PerItem { header, .. } => header,
        }
    }
}

impl fmt::Display for InputLen {
    /// As PROTOCOL.md's opcode table writes it: `8`, `6 + 2n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => write!(f, "{n}"),
            Self::Between(min, max) => write!(f, "{min}-{max}"),
            Self::PerItem { header, item, .. } => write!(f, "{header} + {item}n"),
        }
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{:04X}h ({name})", self.0),
            None => write!(f, "{:04X}h", self.0),
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A mailbox return code (CXL 3.1 table 8-34).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReturnCode(pub u16);

impl ReturnCode {
    pub const SUCCESS: Self = Self(0x00);
    pub const BACKGROUND_COMMAND_STARTED: Self = Self(0x01);
    pub const INVALID_INPUT: Self = Self(0x02);
    pub const UNSUPPORTED: Self = Self(0x03);
    pub const INTERNAL_ERROR: Self = Self(0x04);
    pub const RETRY_REQUIRED: Self = Self(0x05);
    pub const BUSY: Self = Self(0x06);
    pub const MEDIA_DISABLED: Self = Self(0x07);
    pub const FW_TRANSFER_IN_PROGRESS: Self = Self(0x08);
    pub const FW_TRANSFER_OUT_OF_ORDER: Self = Self(0x09);
    pub const FW_VERIFICATION_FAILED: Self = Self(0x0A);
    pub const INVALID_SLOT: Self = Self(0x0B);
    pub const ACTIVATION_FAILED_ROLLED_BACK: Self = Self(0x0C);
    pub const ACTIVATION_FAILED_COLD_RESET: Self = Self(0x0D);
    pub const INVALID_HANDLE: Self = Self(0x0E);
    pub const INVALID_PHYSICAL_ADDRESS: Self = Self(0x0F);
    pub const INJECT_POISON_LIMIT_REACHED: Self = Self(0x10);
    pub const PERMANENT_MEDIA_FAILURE: Self = Self(0x11);
    pub const ABORTED: Self = Self(0x12);
    pub const INVALID_SECURITY_STATE: Self = Self(0x13);
    pub const INCORRECT_PASSPHRASE: Self = Self(0x14);
    pub const UNSUPPORTED_MAILBOX: Self = Self(0x15);
    pub const INVALID_PAYLOAD_LENGTH: Self = Self(0x16);
    pub const INVALID_LOG: Self = Self(0x17);
    pub const INTERRUPTED: Self = Self(0x18);
    pub const UNSUPPORTED_FEATURE_VERSION: Self = Self(0x19);
    pub const UNSUPPORTED_FEATURE_SELECTION: Self = Self(0x1A);
    pub const FEATURE_TRANSFER_IN_PROGRESS: Self = Self(0x1B);
    pub const FEATURE_TRANSFER_OUT_OF_ORDER: Self = Self(0x1C);
    pub const RESOURCES_EXHAUSTED: Self = Self(0x1D);
    pub const INVALID_EXTENT_LIST: Self = Self(0x1E);
    pub const TRANSFER_OUT_OF_ORDER: Self = Self(0x1F);
    pub const REQUEST_ABORT_NOT_SUPPORTED: Self = Self(0x20);
    /// Vendor (queue completions only): the command read lines that are
    /// poisoned or fail their integrity check, so it returns no data from
    /// them. The spec's codes have no such status for a read (CXL.mem
    /// signals it with poisoned data; NVMe's nearest is Unrecovered Read
    /// Error); its result fields say which tokens were affected.
    pub const MEDIA_ERROR: Self = Self(0x7F00);

    /// Return codes of this device outside the spec's table.
    pub const VENDOR: [(Self, &'static str); 1] = [(Self::MEDIA_ERROR, "Media Error (vendor)")];

    /// Every return code the spec defines, with its name.
    pub const ALL: [(Self, &'static str); 33] = [
        (Self::SUCCESS, "Success"),
        (Self::BACKGROUND_COMMAND_STARTED, "Background Command Started"),
        (Self::INVALID_INPUT, "Invalid Input"),
        (Self::UNSUPPORTED, "Unsupported"),
        (Self::INTERNAL_ERROR, "Internal Error"),
        (Self::RETRY_REQUIRED, "Retry Required"),
        (Self::BUSY, "Busy"),
        (Self::MEDIA_DISABLED, "Media Disabled"),
        (Self::FW_TRANSFER_IN_PROGRESS, "FW Transfer in Progress"),
        (Self::FW_TRANSFER_OUT_OF_ORDER, "FW Transfer Out of Order"),
        (Self::FW_VERIFICATION_FAILED, "FW Verification Failed"),
        (Self::INVALID_SLOT, "Invalid Slot"),
        (Self::ACTIVATION_FAILED_ROLLED_BACK, "Activation Failed, FW Rolled Back"),
        (Self::ACTIVATION_FAILED_COLD_RESET, "Activation Failed, Cold Reset Required"),
        (Self::INVALID_HANDLE, "Invalid Handle"),
        (Self::INVALID_PHYSICAL_ADDRESS, "Invalid Physical Address"),
        (Self::INJECT_POISON_LIMIT_REACHED, "Inject Poison Limit Reached"),
        (Self::PERMANENT_MEDIA_FAILURE, "Permanent Media Failure"),
        (Self::ABORTED, "Aborted"),
        (Self::INVALID_SECURITY_STATE, "Invalid Security State"),
        (Self::INCORRECT_PASSPHRASE, "Incorrect Passphrase"),
        (Self::UNSUPPORTED_MAILBOX, "Unsupported Mailbox or CCI"),
        (Self::INVALID_PAYLOAD_LENGTH, "Invalid Payload Length"),
        (Self::INVALID_LOG, "Invalid Log"),
        (Self::INTERRUPTED, "Interrupted"),
        (Self::UNSUPPORTED_FEATURE_VERSION, "Unsupported Feature Version"),
        (Self::UNSUPPORTED_FEATURE_SELECTION, "Unsupported Feature Selection Value"),
        (Self::FEATURE_TRANSFER_IN_PROGRESS, "Feature Transfer in Progress"),
        (Self::FEATURE_TRANSFER_OUT_OF_ORDER, "Feature Transfer Out of Order"),
        (Self::RESOURCES_EXHAUSTED, "Resources Exhausted"),
        (Self::INVALID_EXTENT_LIST, "Invalid Extent List"),
        (Self::TRANSFER_OUT_OF_ORDER, "Transfer Out of Order"),
        (Self::REQUEST_ABORT_NOT_SUPPORTED, "Request Abort Not Supported"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .chain(&Self::VENDOR)
            .find(|(code, _)| *code == self)
            .map_or("Reserved", |(_, name)| name)
    }

    pub fn is_success(self) -> bool {
        self == Self::SUCCESS
    }
}

impl fmt::Debug for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02X}h ({})", self.0, self.name())
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------
// Command Effects Log (§8.2.9.5.2.1)
// ---------------------------------------------------------------------------

/// Identifier of the Command Effects Log, in the spec's byte order.
pub const CEL_UUID: [u8; 16] = [
    0x0d, 0xa9, 0xc0, 0xb5, 0xbf, 0x41, 0x4b, 0x78, 0x8f, 0x79, 0x96, 0xb1, 0x62, 0x3b, 0x3f, 0x17,
];

/// Command Effect bits of a CEL entry.
pub mod effect {
    pub const CONFIG_CHANGE_COLD_RESET: u16 = 1 << 0;
    pub const CONFIG_CHANGE_IMMEDIATE: u16 = 1 << 1;
    pub const DATA_CHANGE_IMMEDIATE: u16 = 1 << 2;
    pub const POLICY_CHANGE_IMMEDIATE: u16 = 1 << 3;
    pub const LOG_CHANGE_IMMEDIATE: u16 = 1 << 4;
    pub const SECURITY_CHANGE_IMMEDIATE: u16 = 1 << 5;
    pub const BACKGROUND_OPERATION: u16 = 1 << 6;
}

/// What each supported command does to the device, as its CEL entry says.
pub fn command_effect(opcode: Opcode) -> u16 {
    match opcode {
        Opcode::CLEAR_EVENT_RECORDS | Opcode::INJECT_EVENT => effect::LOG_CHANGE_IMMEDIATE,
        Opcode::INJECT_POISON | Opcode::CLEAR_POISON | Opcode::INJECT_MEDIA_FAULT => {
            effect::DATA_CHANGE_IMMEDIATE | effect::LOG_CHANGE_IMMEDIATE
        }
        Opcode::SCAN_MEDIA => effect::LOG_CHANGE_IMMEDIATE | effect::BACKGROUND_OPERATION,
        Opcode::INJECT_DEVICE_FAULT => effect::CONFIG_CHANGE_IMMEDIATE,
        Opcode::SET_TIMESTAMP | Opcode::SET_EVENT_INTERRUPT_POLICY => {
            effect::POLICY_CHANGE_IMMEDIATE
        }
        Opcode::CREATE_QUEUE_PAIR
        | Opcode::DELETE_QUEUE_PAIR
        | Opcode::ALLOCATE_DMA
        | Opcode::FREE_DMA => effect::CONFIG_CHANGE_IMMEDIATE,
        _ => 0,
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CelEntry {
    pub opcode: U16,
    pub effect: U16,
}

// ---------------------------------------------------------------------------
// Get Timestamp / Set Timestamp (§8.2.9.4)
// ---------------------------------------------------------------------------

/// Output of Get Timestamp and input of Set Timestamp: nanoseconds since
/// midnight 1 January 1970 UTC; 0 if it was never set.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SetTimestampInput {
    pub timestamp_ns: U64,
}
pub type GetTimestampOutput = SetTimestampInput;

// ---------------------------------------------------------------------------
// Get Supported Logs / Get Log (§8.2.9.5)
// ---------------------------------------------------------------------------

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SupportedLogsHeader {
    pub entries: U16,
    pub reserved: [u8; 6],
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SupportedLogEntry {
    pub log_id: [u8; 16],
    pub log_size: U32,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct GetLogInput {
    pub log_id: [u8; 16],
    pub offset: U32,
    pub length: U32,
}

// ---------------------------------------------------------------------------
// Identify Memory Device (§8.2.9.9.1.1)
// ---------------------------------------------------------------------------

/// Capacities are in multiples of this many bytes.
pub const CAPACITY_UNIT: u64 = 256 << 20;

/// Identify's Poison Handling Capabilities: injected poison persists (it
/// outlives a restart of the device; the list is kept in device DRAM).
pub const POISON_CAP_PERSISTENT: u8 = 1 << 0;
/// Identify's Poison Handling Capabilities: Scan Media is supported.
pub const POISON_CAP_SCAN_MEDIA: u8 = 1 << 1;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IdentifyOutput {
    /// ASCII, NUL padded.
    pub fw_revision: [u8; 16],
    pub total_capacity: U64,
    pub volatile_only_capacity: U64,
    pub persistent_only_capacity: U64,
    pub partition_alignment: U64,
    pub info_event_log_size: U16,
    pub warning_event_log_size: U16,
    pub failure_event_log_size: U16,
    pub fatal_event_log_size: U16,
    pub lsa_size: U32,
    /// 24-bit little-endian.
    pub poison_list_max_records: [u8; 3],
    pub inject_poison_limit: U16,
    pub poison_handling_caps: u8,
    pub qos_telemetry_caps: u8,
    pub dc_event_log_size: U16,
}

// ---------------------------------------------------------------------------
// Get Health Info (§8.2.9.9.3.1)
// ---------------------------------------------------------------------------

/// Life Used value meaning "not implemented".
pub const LIFE_USED_NOT_IMPLEMENTED: u8 = 0xFF;
/// Device Temperature value meaning "not implemented".
pub const TEMPERATURE_NOT_IMPLEMENTED: u16 = 0xFFFF;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct HealthInfoOutput {
    /// [0] maintenance needed, [1] performance degraded, [2] hardware replacement needed.
    pub health_status: u8,
    /// 0 normal, 1 not ready, 2 write persistency lost, 3 all data lost, ...
    pub media_status: u8,
    pub additional_status: u8,
    pub life_used: u8,
    /// Degrees Celsius, two's complement.
    pub device_temperature: U16,
    pub dirty_shutdown_count: U32,
    pub corrected_volatile_error_count: U32,
    pub corrected_persistent_error_count: U32,
}

// ---------------------------------------------------------------------------
// Identify PNM (vendor, C000h)
// ---------------------------------------------------------------------------

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IdentifyPnmOutput {
    pub abi_version: U32,
    pub compute_units: U32,
    pub region_size: U64,
    pub dma_window_offset: U64,
    pub dma_window_size: U64,
    pub dram_offset: U64,
    pub dram_size: U64,
    /// `1 << dtype code` for each key/value element type the firmware scores.
    pub supported_dtypes: U32,
    pub max_head_dim: U32,
    /// Largest k a TOPK command may ask for.
    pub max_k: U32,
    /// Most queries in one GQA group per command.
    pub max_group: U32,
    /// Bytes per KV frame (one page of K or V rows).
    pub kv_frame_size: U32,
    pub max_queue_pairs: U32,
    pub max_queue_entries: U32,
    pub heartbeat_period_us: U32,
    /// ASCII, NUL padded.
    pub fw_revision: [u8; 16],
    /// Where KV frame 0 starts, from the start of device DRAM.
    pub kv_frames_offset: U64,
    pub kv_frame_count: U32,
    pub max_sequences: U32,
}

// ---------------------------------------------------------------------------
// Queue pairs and DMA buffers (vendor, C001h-C004h)
// ---------------------------------------------------------------------------

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CreateQueuePairInput {
    /// Region offset of the submission ring (in the host DMA window).
    pub sq_addr: U64,
    /// Region offset of the completion ring (in the host DMA window).
    pub cq_addr: U64,
    /// Entries in each ring: a power of two in 2..=4096.
    pub entries: U16,
    /// Interrupt vector of `peer_id`, or FFFFh for a polled queue.
    pub irq_vector: U16,
    /// Process that owns the queue ([`Owner`] word); the device reclaims
    /// the queue when that process no longer exists.
    pub owner_pid: U32,
    /// The notification peer whose vector `irq_vector` is; the queue is
    /// also deleted when that peer disconnects. For a guest owner
    /// ([`OWNER_GUEST`]) the peer the guest reaches the device through,
    /// polled queue or not.
    pub peer_id: U16,
    /// Interrupt coalescing: signal once this many completions are pending
    /// (0 or 1: every completion).
    pub coalesce_count: U16,
    /// Interrupt coalescing: signal at the latest this many microseconds
    /// after the first pending completion (0: no time limit beyond the count).
    pub coalesce_usec: U32,
    /// Arbitration class: [`QUEUE_PRIORITY_NORMAL`] or [`QUEUE_PRIORITY_HIGH`].
    pub priority: u8,
    pub reserved: [u8; 7],
}

/// A queue served in turn with the others.
pub const QUEUE_PRIORITY_NORMAL: u8 = 0;
/// A queue served first, in the engine and at the compute units: for
/// latency-critical work (decode-step Top-Ks) next to bulk work (appends,
/// prefill). Normal work still gets one of every [`HIGH_PRIORITY_BURST`] + 1
/// compute-unit turns while both wait, so it is never starved.
pub const QUEUE_PRIORITY_HIGH: u8 = 1;
/// Consecutive high-priority jobs a compute unit takes while normal ones wait.
pub const HIGH_PRIORITY_BURST: u32 = 4;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CreateQueuePairOutput {
    pub queue_id: U16,
    pub reserved: [u8; 6],
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DeleteQueuePairInput {
    pub queue_id: U16,
    pub reserved: [u8; 6],
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AllocateDmaInput {
    /// Bytes wanted; rounded up to 4 KiB.
    pub size: U64,
    /// Owning process, as for queue pairs ([`Owner`] word).
    pub owner_pid: U32,
    /// For a guest owner ([`OWNER_GUEST`]): the notification peer the
    /// guest reaches the device through. Otherwise 0.
    pub peer_id: U16,
    pub reserved: [u8; 2],
}

/// Owner word flag: the owning process runs in a guest (behind
/// notification peer `peer_id`), where its PID means nothing to the
/// device's host. Its resources are reclaimed when that peer disconnects
/// (the guest, or its VMM, went away) or by a reset, not by PID. [30:0]
/// still tells the guest's processes apart (for the per-owner limits).
pub const OWNER_GUEST: u32 = 1 << 31;

/// Who owns a queue pair, a DMA buffer or the Mailbox Lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A process on the device's host, by PID.
    Process(u32),
    /// A process in a guest: its PID there, and the peer the guest is.
    Guest { pid: u32, peer: u16 },
}

impl Owner {
    /// Reads an owner word (and, for a guest, its peer). None for a word
    /// that names nobody (PID 0).
    pub const fn decode(word: u32, peer: u16) -> Option<Self> {
        let pid = word & !OWNER_GUEST;
        if pid == 0 {
            None
        } else if word & OWNER_GUEST != 0 {
            Some(Self::Guest { pid, peer })
        } else {
            Some(Self::Process(pid))
        }
    }

    /// The owner word.
    pub const fn word(self) -> u32 {
        match self {
            Self::Process(pid) => pid,
            Self::Guest { pid, .. } => pid | OWNER_GUEST,
        }
    }

    /// The peer field that goes with the word.
    pub const fn peer(self) -> u16 {
        match self {
            Self::Process(_) => 0,
            Self::Guest { peer, .. } => peer,
        }
    }
}

/// Output of Allocate DMA; input of Free DMA.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DmaBufferAddr {
    /// Region offset of the buffer.
    pub addr: U64,
}
pub type AllocateDmaOutput = DmaBufferAddr;
pub type FreeDmaInput = DmaBufferAddr;

/// Granule of DMA window allocations.
pub const DMA_GRANULE: u64 = 4096;
/// One owner process may hold at most this fraction (1/n) of the host DMA
/// window: a greedy host leaves room for others.
pub const DMA_WINDOW_SHARE_PER_OWNER: u64 = 2;

const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<CelEntry>() == 4);
    assert!(size_of::<SetTimestampInput>() == 8);
    assert!(size_of::<SupportedLogsHeader>() == 8);
    assert!(size_of::<SupportedLogEntry>() == 0x14);
    assert!(size_of::<GetLogInput>() == 0x18);
    assert!(offset_of!(GetLogInput, offset) == 0x10);
    assert!(offset_of!(GetLogInput, length) == 0x14);
    assert!(size_of::<IdentifyOutput>() == 0x45);
    assert!(offset_of!(IdentifyOutput, total_capacity) == 0x10);
    assert!(offset_of!(IdentifyOutput, volatile_only_capacity) == 0x18);
    assert!(offset_of!(IdentifyOutput, persistent_only_capacity) == 0x20);
    assert!(offset_of!(IdentifyOutput, partition_alignment) == 0x28);
    assert!(offset_of!(IdentifyOutput, info_event_log_size) == 0x30);
    assert!(offset_of!(IdentifyOutput, fatal_event_log_size) == 0x36);
    assert!(offset_of!(IdentifyOutput, lsa_size) == 0x38);
    assert!(offset_of!(IdentifyOutput, poison_list_max_records) == 0x3C);
    assert!(offset_of!(IdentifyOutput, inject_poison_limit) == 0x3F);
    assert!(offset_of!(IdentifyOutput, poison_handling_caps) == 0x41);
    assert!(offset_of!(IdentifyOutput, qos_telemetry_caps) == 0x42);
    assert!(offset_of!(IdentifyOutput, dc_event_log_size) == 0x43);
    assert!(size_of::<HealthInfoOutput>() == 0x12);
    assert!(offset_of!(HealthInfoOutput, device_temperature) == 0x04);
    assert!(offset_of!(HealthInfoOutput, dirty_shutdown_count) == 0x06);
    assert!(offset_of!(HealthInfoOutput, corrected_volatile_error_count) == 0x0A);
    assert!(offset_of!(HealthInfoOutput, corrected_persistent_error_count) == 0x0E);
    assert!(size_of::<IdentifyPnmOutput>() == 0x70);
    assert!(offset_of!(IdentifyPnmOutput, kv_frame_size) == 0x40);
    assert!(offset_of!(IdentifyPnmOutput, kv_frames_offset) == 0x60);
    assert!(size_of::<CreateQueuePairInput>() == 0x28);
    assert!(offset_of!(CreateQueuePairInput, priority) == 0x20);
    assert!(offset_of!(CreateQueuePairInput, peer_id) == 0x18);
    assert!(offset_of!(CreateQueuePairInput, coalesce_usec) == 0x1C);
    assert!(offset_of!(CreateQueuePairInput, entries) == 0x10);
    assert!(offset_of!(CreateQueuePairInput, owner_pid) == 0x14);
    assert!(size_of::<CreateQueuePairOutput>() == 8);
    assert!(size_of::<DeleteQueuePairInput>() == 8);
    assert!(size_of::<AllocateDmaInput>() == 0x10);
    assert!(size_of::<DmaBufferAddr>() == 8);
    assert!(offset_of!(IdentifyPnmOutput, region_size) == 0x08);
    assert!(offset_of!(IdentifyPnmOutput, dram_size) == 0x28);
    assert!(offset_of!(IdentifyPnmOutput, supported_dtypes) == 0x30);
    assert!(offset_of!(IdentifyPnmOutput, heartbeat_period_us) == 0x4C);
    assert!(offset_of!(IdentifyPnmOutput, fw_revision) == 0x50);
};

/// Output payload length of each fixed-output command (Get Log and Get
/// Supported Logs vary).
pub fn fixed_output_len(opcode: Opcode) -> Option<usize> {
    Some(match opcode {
        Opcode::CLEAR_EVENT_RECORDS | Opcode::SET_EVENT_INTERRUPT_POLICY => 0,
        Opcode::GET_EVENT_INTERRUPT_POLICY => size_of::<crate::events::EventInterruptPolicy>(),
        Opcode::INJECT_EVENT => size_of::<crate::events::InjectEventOutput>(),
        Opcode::GET_TIMESTAMP => size_of::<GetTimestampOutput>(),
        Opcode::SET_TIMESTAMP => 0,
        Opcode::IDENTIFY_MEMORY_DEVICE => size_of::<IdentifyOutput>(),
        Opcode::GET_HEALTH_INFO => size_of::<HealthInfoOutput>(),
        Opcode::IDENTIFY_PNM => size_of::<IdentifyPnmOutput>(),
        Opcode::CREATE_QUEUE_PAIR => size_of::<CreateQueuePairOutput>(),
        Opcode::DELETE_QUEUE_PAIR | Opcode::FREE_DMA => 0,
        Opcode::ALLOCATE_DMA => size_of::<AllocateDmaOutput>(),
        Opcode::INJECT_POISON
        | Opcode::CLEAR_POISON
        | Opcode::SCAN_MEDIA
        | Opcode::INJECT_MEDIA_FAULT
        | Opcode::INJECT_DEVICE_FAULT => 0,
        Opcode::GET_SCAN_MEDIA_CAPABILITIES => size_of::<crate::media::ScanMediaCapabilities>(),
        _ => return None,
    })
}

/// Reads a NUL-padded ASCII field, dropping the padding and anything not
/// printable (a device's bytes are untrusted).
pub fn ascii_field(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' })
        .collect()
}

/// Writes `text` into a NUL-padded ASCII field, truncating if needed.
pub fn to_ascii_field<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (dst, src) in out.iter_mut().zip(text.bytes()) {
        *dst = src;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_opcode_has_fixed_input() {
        for op in Opcode::ALL {
            assert!(op.input_len().is_some(), "{op}");
            assert!(op.name().is_some());
        }
        assert!(Opcode(0x1234).input_len().is_none());
        let clear = Opcode::CLEAR_EVENT_RECORDS.input_len().unwrap();
        assert!(clear.accepts(6) && clear.accepts(8) && clear.accepts(6 + 2 * 255));
        assert!(!clear.accepts(5) && !clear.accepts(7) && !clear.accepts(6 + 2 * 256));
        assert_eq!(clear.to_string(), "6 + 2n");
        assert_eq!(format!("{}", Opcode(0x1234)), "1234h");
        assert!(Opcode::IDENTIFY_PNM.is_vendor());
    }

    #[test]
    fn return_codes_are_numbered_as_the_spec() {
        for (i, (code, _)) in ReturnCode::ALL.iter().enumerate() {
            assert_eq!(code.0 as usize, i, "table 8-34 is dense from 00h to 20h");
        }
        assert_eq!(ReturnCode(0x16).name(), "Invalid Payload Length");
        assert_eq!(ReturnCode(0x99).name(), "Reserved");
    }

    #[test]
    fn ascii_fields_round_trip_and_sanitise() {
        let f: [u8; 16] = to_ascii_field("pnm-fw 1.0");
        assert_eq!(ascii_field(&f), "pnm-fw 1.0");
        assert_eq!(ascii_field(&[b'a', 0x07, b'b', 0, b'c']), "a?b");
        let long: [u8; 4] = to_ascii_field("abcdefgh");
        assert_eq!(&long, b"abcd");
    }
}
