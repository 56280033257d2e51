//! Mailbox command handlers: input bytes in, output bytes or a refusal out.
//!
//! Pure apart from the clock, so every command and every bad input can be
//! tested without a region.

use std::time::Instant;

use pnm_firmware::LIMITS;
use pnm_protocol::commands::{
    self, AllocateDmaInput, CAPACITY_UNIT, CEL_UUID, CelEntry, CreateQueuePairInput,
    CreateQueuePairOutput, DeleteQueuePairInput, DmaBufferAddr, GetLogInput, GetTimestampOutput,
    HealthInfoOutput, IdentifyOutput, IdentifyPnmOutput, Owner, SetTimestampInput,
    SupportedLogEntry, SupportedLogsHeader,
};
use pnm_protocol::queue::{KV_FRAME_SIZE, MAX_QUEUE_ENTRIES, MAX_QUEUE_PAIRS};
use pnm_protocol::regs::{ABI_VERSION, MAILBOX_PAYLOAD_SIZE};
use pnm_protocol::{Opcode, RegionLayout, ReturnCode};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use pnm_firmware::events::EventLogs;
use pnm_protocol::events::{
    self, ClearRequest, EventInterruptPolicy, EventLog, InjectEventInput, InjectEventOutput,
    InterruptMode,
};

use crate::dma::DmaAllocator;
use crate::queues::QueueTable;
use crate::refusal::{Reason, Refusal};

/// The device's Timestamp: unset until the host sets it, then advancing
/// with the device's monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct TimestampClock {
    set: Option<(u64, Instant)>,
}

impl TimestampClock {
    pub fn get(&self, now: Instant) -> u64 {
        self.set.map_or(0, |(value, at)| {
            value.saturating_add(now.saturating_duration_since(at).as_nanos() as u64)
        })
    }

    pub fn set(&mut self, value: u64, now: Instant) {
        self.set = Some((value, now));
    }
}

/// Counters that Get Health Info reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct HealthCounters {
    pub dirty_shutdown_count: u32,
    pub corrected_volatile_errors: u32,
}

/// Where the KV store's frames are, for Identify PNM.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvGeometry {
    pub frames_offset: u64,
    pub frame_count: u32,
}

/// What the mailbox needs to know about the device, and the resources its
/// vendor commands manage.
#[derive(Debug)]
pub struct MailboxState {
    pub layout: RegionLayout,
    pub compute_units: u32,
    pub heartbeat_period_us: u32,
    pub kv: KvGeometry,
    pub clock: TimestampClock,
    pub health: HealthCounters,
    pub queues: QueueTable,
    pub dma: DmaAllocator,
    pub events: EventLogs,
    /// Event Interrupt Policy, per log.
    pub event_policy: [InterruptMode; 4],
    /// Fault injection commands are served (`--allow-injection`).
    pub allow_injection: bool,
}

/// Reads a command's fixed-size input.
fn read_input<T: FromBytes + KnownLayout + Immutable>(
    command: Opcode,
    input: &[u8],
) -> Result<T, Refusal> {
    T::read_from_bytes(input).map_err(|_| {
        Refusal::new(
            ReturnCode::INVALID_PAYLOAD_LENGTH,
            Reason::InputLength {
                command,
                expected: commands::InputLen::Exact(size_of::<T>()),
                got: input.len(),
            },
        )
    })
}

/// The Command Effects Log: every supported opcode with its effects.
/// Fault injection commands are listed only when they are served.
pub fn command_effects_log(allow_injection: bool) -> Vec<u8> {
    Opcode::ALL
        .iter()
        .filter(|&&op| allow_injection || op != Opcode::INJECT_EVENT)
        .flat_map(|&op| {
            let entry =
                CelEntry { opcode: op.0.into(), effect: commands::command_effect(op).into() };
            entry.as_bytes().to_vec()
        })
        .collect()
}

impl MailboxState {
    /// Logs that the device found its region left by a device that did not
    /// stop in order: a Memory Module record (Health Status Change, with
    /// the health that includes the new Dirty Shutdown Count) in the
    /// warning log.
    pub fn log_dirty_shutdown(&mut self) {
        let mut record = events::EventRecord::new_zeroed();
        record.header.uuid = events::uuid::MEMORY_MODULE;
        let data = events::MemoryModule {
            device_event_type: events::device_event::HEALTH_STATUS_CHANGE,
            health: self.health_info(),
            reserved: [0; 0x3D],
        };
        record.data.copy_from_slice(data.as_bytes());
        self.log_event(EventLog::Warning, record, Instant::now());
    }

    /// Adds a record to a log; if the log was empty and its policy asks
    /// for MSI/MSI-X, rings that vector of every host. Returns the handle
    /// (None: the log was full).
    pub fn log_event(
        &mut self,
        log: EventLog,
        record: events::EventRecord,
        now: Instant,
    ) -> Option<u16> {
        let was_empty = self.events.len(log) == 0;
        let handle = self.events.insert(log, record, self.clock.get(now));
        if was_empty
            && handle.is_some()
            && let InterruptMode::Msi(vector) = self.event_policy[log.index()]
        {
            self.queues.peers().ring_all(u16::from(vector));
        }
        handle
    }

    /// Set Event Interrupt Policy: each log's byte must be none or MSI/MSI-X
    /// on one of the 8 vectors (no firmware interrupts here); a Dynamic
    /// Capacity byte must be 0 (no such log).
    fn set_event_policy(&mut self, input: &[u8]) -> Result<(), Refusal> {
        let mut policy = [InterruptMode::None; 4];
        for (i, &setting) in input.iter().enumerate() {
            let log = EventLog::from_wire(i as u8).map_or("dynamic capacity", EventLog::name);
            let bad = |why| Refusal::invalid(Reason::EventInterruptPolicy { log, setting, why });
            match (i, InterruptMode::decode(setting)) {
                (4, _) if setting != 0 => return Err(bad("this device keeps no such log")),
                (4, _) => {}
                (_, None) => return Err(bad("reserved bits or mode")),
                (_, Some(InterruptMode::Firmware(_))) => {
                    return Err(bad("firmware interrupts are not supported"));
                }
                (_, Some(InterruptMode::Msi(v)))
                    if u16::from(v) >= pnm_protocol::notify::VECTORS =>
                {
                    return Err(bad("vector beyond the 8 each peer has"));
                }
                (_, Some(mode)) => policy[i] = mode,
            }
        }
        self.event_policy = policy;
        Ok(())
    }

    /// Executes one mailbox command.
    pub fn execute(
        &mut self,
        opcode: Opcode,
        input: &[u8],
        now: Instant,
    ) -> Result<Vec<u8>, Refusal> {
        let expected = opcode
            .input_len()
            .ok_or(Refusal::new(ReturnCode::UNSUPPORTED, Reason::UnsupportedCommand(opcode)))?;
        if !expected.accepts(input.len()) {
            return Err(Refusal::new(
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                Reason::InputLength { command: opcode, expected, got: input.len() },
            ));
        }

        match opcode {
            Opcode::GET_EVENT_RECORDS => {
                let log = EventLog::from_wire(input[0])
                    .ok_or(Refusal::invalid(Reason::UnknownEventLog(input[0])))?;
                let room = (MAILBOX_PAYLOAD_SIZE as usize - events::GET_OUTPUT_HEADER_LEN)
                    / events::RECORD_LEN;
                Ok(self.events.get(log, room).encode())
            }
            Opcode::CLEAR_EVENT_RECORDS => {
                // A length that disagrees with the handle count is a payload
                // length error (as QEMU answers it); other bad input, Invalid Input.
                let request = ClearRequest::decode(input).map_err(|e| match e {
                    events::ClearInputError::HandleBytes { .. } => {
                        Refusal::new(ReturnCode::INVALID_PAYLOAD_LENGTH, e.into())
                    }
                    _ => Refusal::invalid(e.into()),
                })?;
                self.events
                    .clear(&request)
                    .map_err(|e| Refusal::new(ReturnCode::INVALID_HANDLE, e.into()))?;
                Ok(Vec::new())
            }
            Opcode::GET_EVENT_INTERRUPT_POLICY => {
                let settings = self.event_policy.map(InterruptMode::encode);
                Ok(EventInterruptPolicy { settings }.as_bytes().to_vec())
            }
            Opcode::SET_EVENT_INTERRUPT_POLICY => {
                self.set_event_policy(input)?;
                Ok(Vec::new())
            }
            Opcode::INJECT_EVENT => {
                if !self.allow_injection {
                    return Err(Refusal::new(ReturnCode::UNSUPPORTED, Reason::InjectionNotAllowed));
                }
                let input = read_input::<InjectEventInput>(opcode, input)?;
                let log = EventLog::from_wire(input.event_log)
                    .ok_or(Refusal::invalid(Reason::UnknownEventLog(input.event_log)))?;
                if input.reserved != [0; 7] {
                    return Err(Refusal::invalid(Reason::ReservedNotZero));
                }
                let handle = self.log_event(log, input.record, now).unwrap_or(0);
                Ok(InjectEventOutput { handle: handle.into(), reserved: [0; 6] }
                    .as_bytes()
                    .to_vec())
            }
            Opcode::GET_TIMESTAMP => {
                let out = GetTimestampOutput { timestamp_ns: self.clock.get(now).into() };
                Ok(out.as_bytes().to_vec())
            }
            Opcode::SET_TIMESTAMP => {
                let input = read_input::<SetTimestampInput>(opcode, input)?;
                self.clock.set(input.timestamp_ns.get(), now);
                Ok(Vec::new())
            }
            Opcode::GET_SUPPORTED_LOGS => {
                let header = SupportedLogsHeader { entries: 1.into(), reserved: [0; 6] };
                let cel = SupportedLogEntry {
                    log_id: CEL_UUID,
                    log_size: (command_effects_log(self.allow_injection).len() as u32).into(),
                };
                Ok([header.as_bytes(), cel.as_bytes()].concat())
            }
            Opcode::GET_LOG => self.get_log(read_input(opcode, input)?),
            Opcode::IDENTIFY_MEMORY_DEVICE => Ok(self.identify().as_bytes().to_vec()),
            Opcode::GET_HEALTH_INFO => Ok(self.health_info().as_bytes().to_vec()),
            Opcode::IDENTIFY_PNM => Ok(self.identify_pnm().as_bytes().to_vec()),
            Opcode::CREATE_QUEUE_PAIR => {
                let input = read_input::<CreateQueuePairInput>(opcode, input)?;
                let queue_id = self.queues.create(&input)?;
                Ok(CreateQueuePairOutput { queue_id: queue_id.into(), reserved: [0; 6] }
                    .as_bytes()
                    .to_vec())
            }
            Opcode::DELETE_QUEUE_PAIR => {
                let input = read_input::<DeleteQueuePairInput>(opcode, input)?;
                self.queues.delete(input.queue_id.get())?;
                Ok(Vec::new())
            }
            Opcode::ALLOCATE_DMA => {
                let input = read_input::<AllocateDmaInput>(opcode, input)?;
                let owner = Owner::decode(input.owner_pid.get(), input.peer_id.get());
                if let Some(Owner::Guest { peer, .. }) = owner
                    && !self.queues.peer_present(peer)
                {
                    return Err(Refusal::invalid(Reason::NoSuchPeer(peer)));
                }
                let addr = self.dma.allocate(input.size.get(), owner)?;
                Ok(DmaBufferAddr { addr: addr.into() }.as_bytes().to_vec())
            }
            Opcode::FREE_DMA => {
                let input = read_input::<DmaBufferAddr>(opcode, input)?;
                if !self.dma.free(input.addr.get()) {
                    return Err(Refusal::invalid(Reason::NoSuchDmaBuffer(input.addr.get())));
                }
                Ok(Vec::new())
            }
            _ => Err(Refusal::new(ReturnCode::UNSUPPORTED, Reason::UnsupportedCommand(opcode))),
        }
    }

    fn get_log(&self, input: GetLogInput) -> Result<Vec<u8>, Refusal> {
        if input.log_id != CEL_UUID {
            return Err(Refusal::new(ReturnCode::INVALID_LOG, Reason::UnknownLog));
        }
        let log = command_effects_log(self.allow_injection);
        let offset = input.offset.get() as u64;
        let length = input.length.get() as u64;
        let size = log.len() as u64;
        if length > MAILBOX_PAYLOAD_SIZE || offset + length > size {
            return Err(Refusal::invalid(Reason::LogRange { offset, length, size }));
        }
        Ok(log[offset as usize..(offset + length) as usize].to_vec())
    }

    fn identify(&self) -> IdentifyOutput {
        // Capacity is reported in 256 MiB units, rounded down as a host may
        // only map whole units; Identify PNM gives the exact byte count.
        let capacity = self.layout.dram_size / CAPACITY_UNIT;
        IdentifyOutput {
            fw_revision: commands::to_ascii_field(LIMITS.revision),
            total_capacity: capacity.into(),
            volatile_only_capacity: capacity.into(),
            persistent_only_capacity: 0.into(),
            partition_alignment: 0.into(),
            info_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            warning_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            failure_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            fatal_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            lsa_size: 0.into(),
            poison_list_max_records: [0; 3],
            inject_poison_limit: 0.into(),
            poison_handling_caps: 0,
            qos_telemetry_caps: 0,
            dc_event_log_size: 0.into(),
        }
    }

    fn health_info(&self) -> HealthInfoOutput {
        HealthInfoOutput {
            health_status: 0,
            media_status: 0,
            additional_status: 0,
            life_used: commands::LIFE_USED_NOT_IMPLEMENTED,
            device_temperature: commands::TEMPERATURE_NOT_IMPLEMENTED.into(),
            dirty_shutdown_count: self.health.dirty_shutdown_count.into(),
            corrected_volatile_error_count: self.health.corrected_volatile_errors.into(),
            corrected_persistent_error_count: 0.into(),
        }
    }

    fn identify_pnm(&self) -> IdentifyPnmOutput {
        IdentifyPnmOutput {
            abi_version: ABI_VERSION.into(),
            compute_units: self.compute_units.into(),
            region_size: self.layout.size.into(),
            dma_window_offset: self.layout.dma_window_offset.into(),
            dma_window_size: self.layout.dma_window_size.into(),
            dram_offset: self.layout.dram_offset.into(),
            dram_size: self.layout.dram_size.into(),
            supported_dtypes: LIMITS.dtype_mask().into(),
            max_head_dim: LIMITS.max_head_dim.into(),
            max_k: LIMITS.max_k.into(),
            max_group: LIMITS.max_group.into(),
            kv_frame_size: KV_FRAME_SIZE.into(),
            max_queue_pairs: MAX_QUEUE_PAIRS.into(),
            max_queue_entries: MAX_QUEUE_ENTRIES.into(),
            heartbeat_period_us: self.heartbeat_period_us.into(),
            fw_revision: commands::to_ascii_field(LIMITS.revision),
            kv_frames_offset: self.kv.frames_offset.into(),
            kv_frame_count: self.kv.frame_count.into(),
            max_sequences: LIMITS.max_sequences.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn state() -> MailboxState {
        // The mailbox's own state never touches the region; queue commands
        // are tested against a real region in `tests/`.
        let region = crate::Region::embedded(1 << 30, None).unwrap();
        let layout = region.layout;
        let regs = region.regs();
        // Keep the memfd mapped for the test's duration.
        std::mem::forget(region);
        MailboxState {
            layout,
            compute_units: 2,
            heartbeat_period_us: 10_000,
            kv: KvGeometry::default(),
            clock: TimestampClock::default(),
            health: HealthCounters { dirty_shutdown_count: 3, corrected_volatile_errors: 0 },
            queues: QueueTable::new(regs, layout, crate::notify::Peers::default()),
            dma: DmaAllocator::new(&layout),
            events: EventLogs::default(),
            event_policy: Default::default(),
            allow_injection: false,
        }
    }

    #[test]
    fn unknown_opcodes_are_unsupported() {
        let now = Instant::now();
        for op in [0x0000, 0x0001, 0x4300, 0xC0FF, 0xFFFF] {
            assert_eq!(
                state().execute(Opcode(op), &[], now).map_err(|r| r.code),
                Err(ReturnCode::UNSUPPORTED)
            );
        }
    }

    #[test]
    fn wrong_input_lengths_are_refused() {
        let now = Instant::now();
        let mut s = state();
        assert_eq!(
            s.execute(Opcode::IDENTIFY_MEMORY_DEVICE, &[0], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::SET_TIMESTAMP, &[0; 7], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::SET_TIMESTAMP, &[0; 9], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::GET_LOG, &[0; 0x17], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
    }

    #[test]
    fn queue_pairs_take_a_priority_and_refuse_unknown_ones() {
        use pnm_protocol::commands::{QUEUE_PRIORITY_HIGH, QUEUE_PRIORITY_NORMAL};
        let now = Instant::now();
        let mut s = state();
        let window = s.layout.dma_window_offset;
        let input = |at: u64, priority: u8, reserved: u8| CreateQueuePairInput {
            sq_addr: (window + at).into(),
            cq_addr: (window + at + 64 * 16).into(),
            entries: 16.into(),
            irq_vector: pnm_protocol::queue::IRQ_NONE.into(),
            owner_pid: 4242.into(),
            peer_id: 0.into(),
            coalesce_count: 0.into(),
            coalesce_usec: 0.into(),
            priority,
            reserved: [reserved, 0, 0, 0, 0, 0, 0],
        };
        for (i, priority) in [QUEUE_PRIORITY_NORMAL, QUEUE_PRIORITY_HIGH].into_iter().enumerate() {
            let at = 4096 * i as u64;
            assert!(
                s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, priority, 0).as_bytes(), now)
                    .is_ok()
            );
        }
        for (priority, reserved) in [(2, 0), (0xFF, 0), (QUEUE_PRIORITY_HIGH, 1)] {
            assert_eq!(
                s.execute(
                    Opcode::CREATE_QUEUE_PAIR,
                    input(8192, priority, reserved).as_bytes(),
                    now
                )
                .map_err(|r| r.code),
                Err(ReturnCode::INVALID_INPUT)
            );
        }
        // Every queue needs an owner to be reclaimed from.
        let mut ownerless = input(8192, QUEUE_PRIORITY_NORMAL, 0);
        ownerless.owner_pid = 0.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, ownerless.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // One owner gets half the device's queue pairs (2 made above).
        let per_owner = pnm_protocol::queue::MAX_QUEUE_PAIRS_PER_OWNER as u64;
        for i in 2..per_owner {
            let at = 8192 * i;
            assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, 0, 0).as_bytes(), now).is_ok());
        }
        let at = 8192 * per_owner;
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, 0, 0).as_bytes(), now)
                .map_err(|r| r.code),
            Err(ReturnCode::RESOURCES_EXHAUSTED)
        );
        let mut other = input(at, 0, 0);
        other.owner_pid = 4243.into();
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, other.as_bytes(), now).is_ok());
        // A guest owner names the peer it is; one not connected is refused,
        // for queues and buffers alike.
        let mut guest = input(at + 8192, 0, 0);
        guest.owner_pid = (4242 | pnm_protocol::commands::OWNER_GUEST).into();
        guest.peer_id = 5.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, guest.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        let dma = AllocateDmaInput {
            size: 4096.into(),
            owner_pid: guest.owner_pid,
            peer_id: 5.into(),
            reserved: [0; 2],
        };
        assert_eq!(
            s.execute(Opcode::ALLOCATE_DMA, dma.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // A peer held for its live process since a device restart (a QEMU
        // that did not connect again) is the guest's still: its queues,
        // with interrupts that reach no one, and buffers are accepted. One
        // held for a process that is gone is refused.
        s.queues.peers().hold_for(5, std::process::id());
        assert!(s.execute(Opcode::ALLOCATE_DMA, dma.as_bytes(), now).is_ok());
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, guest.as_bytes(), now).is_ok());
        let mut interrupted = input(at + 2 * 8192, 0, 0);
        interrupted.owner_pid = guest.owner_pid;
        interrupted.peer_id = 5.into();
        interrupted.irq_vector = 0.into();
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, interrupted.as_bytes(), now).is_ok());
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = exited.id();
        exited.wait().unwrap();
        s.queues.peers().hold_for(6, gone_pid);
        let mut orphan = input(at + 3 * 8192, 0, 0);
        orphan.owner_pid = guest.owner_pid;
        orphan.peer_id = 6.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, orphan.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // The pre-priority 32-byte input is a length error, not a normal queue.
        let short = &input(8192, 0, 0).as_bytes()[..32].to_vec();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, short, now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
    }

    #[test]
    fn timestamp_is_zero_until_set_then_advances() {
        let t0 = Instant::now();
        let mut s = state();
        assert_eq!(s.execute(Opcode::GET_TIMESTAMP, &[], t0).unwrap(), 0u64.to_le_bytes());
        s.execute(Opcode::SET_TIMESTAMP, &1_000u64.to_le_bytes(), t0).unwrap();
        let later = t0 + Duration::from_micros(5);
        assert_eq!(s.execute(Opcode::GET_TIMESTAMP, &[], later).unwrap(), 6_000u64.to_le_bytes());
    }

    #[test]
    fn cel_lists_every_opcode() {
        let now = Instant::now();
        let mut s = state();
        // Fault injection is listed only where it is served.
        assert_eq!(command_effects_log(false).len(), (Opcode::ALL.len() - 1) * 4);
        s.allow_injection = true;
        let logs = s.execute(Opcode::GET_SUPPORTED_LOGS, &[], now).unwrap();
        assert_eq!(logs.len(), 8 + 0x14);
        assert_eq!(&logs[8..24], &CEL_UUID);
        let size = u32::from_le_bytes(logs[24..28].try_into().unwrap());
        assert_eq!(size as usize, Opcode::ALL.len() * 4);
        let mut req = GetLogInput { log_id: CEL_UUID, offset: 0.into(), length: size.into() };
        let cel = s.execute(Opcode::GET_LOG, req.as_bytes(), now).unwrap();
        let opcodes: Vec<u16> = cel.chunks(4).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(opcodes, Opcode::ALL.map(|o| o.0));
        // A partial read at an offset.
        req.offset = 4.into();
        req.length = 4.into();
        assert_eq!(s.execute(Opcode::GET_LOG, req.as_bytes(), now).unwrap(), &cel[4..8]);
        // Reads past the end, and unknown logs.
        req.length = size.into();
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        req.offset = u32::MAX.into();
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        req.log_id[0] ^= 1;
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_LOG)
        );
    }

    #[test]
    fn identify_reports_dram_in_capacity_units() {
        let out = state().execute(Opcode::IDENTIFY_MEMORY_DEVICE, &[], Instant::now()).unwrap();
        let id = IdentifyOutput::read_from_bytes(&out).unwrap();
        // 1 GiB region with 130 MiB before DRAM: 894 MiB of DRAM = 3 whole units.
        assert_eq!(id.total_capacity.get(), 3);
        assert_eq!(id.volatile_only_capacity.get(), 3);
        assert_eq!(commands::ascii_field(&id.fw_revision), LIMITS.revision);
        let health = state().execute(Opcode::GET_HEALTH_INFO, &[], Instant::now()).unwrap();
        assert_eq!(
            HealthInfoOutput::read_from_bytes(&health).unwrap().dirty_shutdown_count.get(),
            3
        );
    }
}
