//! A misbehaving device, played by the test on a real region: the driver
//! must turn everything it sends back into typed errors, never a panic or
//! an out-of-bounds read.

use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pnm_device::Region;
use pnm_host::{Device, Error};
use pnm_protocol::commands::{IdentifyPnmOutput, SupportedLogEntry, SupportedLogsHeader};
use pnm_protocol::regs::{self, mailbox, memdev_status, pnm};
use pnm_protocol::{Opcode, SharedMemory};
use zerocopy::{FromZeros, IntoBytes};

/// What the rogue device answers: (return code, output length, payload).
type Answer = Box<dyn Fn(Opcode) -> (u16, u32, Vec<u8>) + Send>;

struct Rogue {
    region: Region,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rogue {
    fn start(answer: Answer) -> Self {
        let region = Region::embedded(8 << 20, None).unwrap();
        let regs = region.regs();
        regs.store_u64(regs::MEMDEV_STATUS_OFFSET, memdev_status::READY, Release);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || serve(regs, &stop, answer))
        };
        Self { region, stop, thread: Some(thread) }
    }

    fn open(&self) -> Device {
        let options = pnm_host::DeviceOptions {
            mailbox_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        Device::open_with(&self.region.path, &options).unwrap()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
    }
}

fn serve(regs: SharedMemory, stop: &AtomicBool, answer: Answer) {
    let mb = regs::MAILBOX_OFFSET;
    while !stop.load(Acquire) {
        let control = regs.load_u32(mb + mailbox::CONTROL, Acquire);
        if control & mailbox::CONTROL_DOORBELL == 0 {
            std::thread::yield_now();
            continue;
        }
        let (opcode, _) = mailbox::decode_command(regs.load_u64(mb + mailbox::COMMAND, Acquire));
        let (code, len, payload) = answer(Opcode(opcode));
        regs.write_bytes(mb + mailbox::PAYLOAD, &payload).unwrap();
        regs.store_u64(mb + mailbox::COMMAND, mailbox::encode_command(opcode, len), Relaxed);
        regs.store_u64(mb + mailbox::STATUS, mailbox::encode_status(code, 0), Relaxed);
        regs.store_u32(mb + mailbox::CONTROL, control & !mailbox::CONTROL_DOORBELL, Release);
    }
}

fn malformed<T: std::fmt::Debug>(result: pnm_host::Result<T>) -> String {
    match result {
        Err(Error::MalformedOutput { reason, .. }) => reason,
        other => panic!("expected MalformedOutput, got {other:?}"),
    }
}

#[test]
fn output_length_beyond_the_payload_is_refused() {
    let rogue = Rogue::start(Box::new(|_| (0, 0x1F_FFFF, vec![])));
    let dev = rogue.open();
    assert!(malformed(dev.identify()).contains("exceeds the payload size"));
    assert!(malformed(dev.mailbox_raw(Opcode::GET_TIMESTAMP, &[])).contains("exceeds"));
}

#[test]
fn wrong_fixed_output_lengths_are_refused() {
    let rogue = Rogue::start(Box::new(|_| (0, 3, vec![1, 2, 3])));
    let dev = rogue.open();
    malformed(dev.identify());
    malformed(dev.health_info());
    malformed(dev.get_timestamp());
    malformed(dev.identify_pnm());
    malformed(dev.set_timestamp(5));
    malformed(dev.supported_logs());
}

#[test]
fn inconsistent_log_lists_are_refused() {
    let rogue = Rogue::start(Box::new(|op| {
        if op == Opcode::GET_SUPPORTED_LOGS {
            // Claims three entries, carries one.
            let header = SupportedLogsHeader { entries: 3.into(), reserved: [0; 6] };
            let entry = SupportedLogEntry::new_zeroed();
            let payload = [header.as_bytes(), entry.as_bytes()].concat();
            (0, payload.len() as u32, payload)
        } else {
            (0, 0, vec![])
        }
    }));
    let dev = rogue.open();
    assert!(malformed(dev.supported_logs()).contains("counts 3 entries"));
}

#[test]
fn identify_pnm_disagreeing_with_the_registers_is_refused() {
    let rogue = Rogue::start(Box::new(|_| {
        let mut out = IdentifyPnmOutput::new_zeroed();
        out.region_size = (1u64 << 40).into();
        (0, out.as_bytes().len() as u32, out.as_bytes().to_vec())
    }));
    let dev = rogue.open();
    assert!(malformed(dev.identify_pnm()).contains("disagrees"));
}

#[test]
fn background_started_for_a_foreground_command_is_refused() {
    let rogue = Rogue::start(Box::new(|_| (1, 0, vec![])));
    let dev = rogue.open();
    assert!(malformed(dev.identify()).contains("background"));
}

#[test]
fn bogus_capability_headers_are_refused_at_open() {
    let rogue = Rogue::start(Box::new(|_| (0, 0, vec![])));
    let regs = rogue.region.regs();
    // The mailbox header now claims registers past the register block.
    let mailbox_header = regs::CAP_ARRAY_OFFSET + regs::CAP_HEADER_SIZE * 2;
    regs.store_u32(mailbox_header + 4, 0xFFFF_0000, Release);
    match Device::open(&rogue.region.path) {
        Err(Error::NotADevice { reason, .. }) => assert!(reason.contains("outside"), "{reason}"),
        other => panic!("{other:?}"),
    }
    regs.store_u32(mailbox_header + 4, regs::MAILBOX_OFFSET as u32, Release);
    // A PNM capability without the magic is someone else's vendor capability.
    regs.store_u64(regs::PNM_OFFSET + pnm::MAGIC, 0, Release);
    match Device::open(&rogue.region.path) {
        Err(Error::NotADevice { reason, .. }) => assert!(reason.contains("PNM"), "{reason}"),
        other => panic!("{other:?}"),
    }
    regs.store_u64(regs::PNM_OFFSET + pnm::MAGIC, pnm::MAGIC_VALUE, Release);
    // A layout that does not fit the file.
    regs.store_u64(regs::PNM_OFFSET + pnm::DRAM_SIZE, 1 << 40, Release);
    assert!(matches!(Device::open(&rogue.region.path), Err(Error::NotADevice { .. })));
}
