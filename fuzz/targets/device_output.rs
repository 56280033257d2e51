//! What a device hands the host driver in mailbox output: Get Event
//! Records, Get Poison List and Get Scan Media Results, decoded by the
//! driver's own decoders. The first byte picks the decoder (and the event
//! log); whatever the rest, decoding answers a value or a typed error,
//! never panics, and what it accepts is well formed.

use pnm_host::{EventLog, PoisonList, ScanResults};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&which, out)) = data.split_first() else { return };
        match which % 3 {
            0 => {
                let log = EventLog::ALL[usize::from(which / 3) % 4];
                if let Ok(records) = pnm_host::commands::EventRecords::decode(log, out) {
                    assert!(records.records.iter().all(|r| r.handle != 0 || out.len() >= 32));
                }
            }
            1 => {
                if let Ok(list) = PoisonList::decode(out) {
                    assert!(list.records.iter().all(|r| r.dpa % 64 == 0 && r.lines > 0));
                }
            }
            _ => {
                if let Ok((results, _)) = ScanResults::decode(out) {
                    assert!(results.records.iter().all(|r| r.dpa % 64 == 0 && r.lines > 0));
                }
            }
        }
    });
}
