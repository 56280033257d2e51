//! The device's mailbox, as a host drives it: each input is a sequence of
//! commands, `[opcode u16][length u16][payload]...`, run against a fresh
//! mailbox (with fault injection on, so every command is reachable).
//! Whatever the bytes, each command answers output or a refusal; none may
//! panic or leave its output larger than the payload area.

use std::time::Instant;

use pnm_device::dma::DmaAllocator;
use pnm_device::executor::DramView;
use pnm_device::mailbox::{HealthCounters, KvGeometry, MailboxState, TimestampClock};
use pnm_device::notify::Peers;
use pnm_device::queues::QueueTable;
use pnm_firmware::kv::KvStore;
use pnm_protocol::Opcode;
use pnm_protocol::regs::MAILBOX_PAYLOAD_SIZE;

fn main() {
    let region = pnm_device::Region::embedded(16 << 20, None).expect("a memfd region");
    let (layout, regs) = (region.layout, region.regs());
    // One store for every run: poison and corruption injected by one input
    // stay for the next (the list is bounded), as on a device that serves
    // many hosts.
    let (store, _) = KvStore::open(DramView::new(regs, &layout)).expect("a KV store");
    let store = std::sync::Arc::new(std::sync::RwLock::new(store));
    afl::fuzz!(|data: &[u8]| {
        let mut state = MailboxState {
            layout,
            compute_units: 2,
            heartbeat_period_us: 10_000,
            kv: KvGeometry::default(),
            clock: TimestampClock::default(),
            health: HealthCounters::default(),
            queues: QueueTable::new(regs, layout, Peers::default()),
            dma: DmaAllocator::new(&layout),
            events: Default::default(),
            event_policy: Default::default(),
            allow_injection: true,
            store: store.clone(),
            scan: None,
            scan_results: None,
            started_background: false,
            logged_lines: Default::default(),
            faults: Default::default(),
            units_dead_logged: 0,
            thermal: Default::default(),
        };
        let mut rest = data;
        while rest.len() >= 4 {
            let opcode = Opcode(u16::from_le_bytes([rest[0], rest[1]]));
            let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
            let (payload, tail) = rest[4..].split_at(len);
            rest = tail;
            if let Ok(out) = state.execute(opcode, payload, Instant::now()) {
                assert!(out.len() as u64 <= MAILBOX_PAYLOAD_SIZE, "{opcode}: {} bytes", out.len());
            }
            // A Scan Media runs to its end between commands, as the engine
            // steps it.
            while let Some((_, false)) = state.step_scan(Instant::now()) {}
        }
    });
}
