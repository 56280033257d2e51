//! The device's four event logs (CXL 3.1 §8.2.9.2): bounded queues of
//! 128-byte records with nonzero handles, overflow accounting when a log
//! is full, and clearing by handle or all at once.
//!
//! Pure: the caller supplies each event's timestamp.

use std::collections::VecDeque;

use pnm_protocol::events::{
    ClearRequest, EventLog, EventRecord, GET_FLAG_MORE_RECORDS, GET_FLAG_OVERFLOW,
    GetEventRecordsHeader, RECORD_LEN, flags,
};
use zerocopy::IntoBytes;

/// Records each log holds before it overflows. Small enough that a host
/// that never reads a log learns of it (overflow) rather than the device
/// keeping everything, large enough for a burst of one scrub's findings.
pub const LOG_CAPACITY: usize = 64;

/// Why a Clear Event Records was refused: nothing was cleared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClearError {
    #[error("handle {handle} names no record in the {log} log", log = .log.name())]
    NoSuchRecord { log: EventLog, handle: u16 },
    #[error("handle {0} is given twice")]
    Repeated(u16),
}

/// Overflow accounting of one log: records lost while it was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// Saturates at u16::MAX, as the wire field does.
    pub count: u16,
    pub first_timestamp: u64,
    pub last_timestamp: u64,
}

#[derive(Debug, Clone, Default)]
struct Log {
    records: VecDeque<EventRecord>,
    /// The last handle given; handles run 1..=u16::MAX, then wrap to 1.
    last_handle: u16,
    overflow: Option<Overflow>,
}

impl Log {
    fn next_handle(&mut self) -> u16 {
        loop {
            self.last_handle = self.last_handle.checked_add(1).unwrap_or(1);
            let h = self.last_handle;
            // A wrapped handle never names two records (64 live at most).
            if !self.records.iter().any(|r| r.header.handle.get() == h) {
                return h;
            }
        }
    }
}

/// What Get Event Records returns for one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub records: Vec<EventRecord>,
    /// More records are in the log than were returned.
    pub more: bool,
    pub overflow: Option<Overflow>,
}

impl Fetched {
    /// Get Event Records' output: header, then the records.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.overflow.is_some() {
            flags |= GET_FLAG_OVERFLOW;
        }
        if self.more {
            flags |= GET_FLAG_MORE_RECORDS;
        }
        let o =
            self.overflow.unwrap_or(Overflow { count: 0, first_timestamp: 0, last_timestamp: 0 });
        let header = GetEventRecordsHeader {
            flags,
            reserved0: 0,
            overflow_error_count: o.count.into(),
            first_overflow_timestamp: o.first_timestamp.into(),
            last_overflow_timestamp: o.last_timestamp.into(),
            record_count: (self.records.len() as u16).into(),
            reserved1: [0; 10],
        };
        let mut out = header.as_bytes().to_vec();
        for r in &self.records {
            out.extend_from_slice(r.as_bytes());
        }
        out
    }
}

/// The four logs.
#[derive(Debug, Clone, Default)]
pub struct EventLogs {
    logs: [Log; 4],
}

impl EventLogs {
    /// Adds `record` to `log`, stamping its length, severity, handle and
    /// `timestamp`; returns its handle, or None if the log was full (the
    /// record is lost and counted as overflow).
    pub fn insert(
        &mut self,
        log: EventLog,
        mut record: EventRecord,
        timestamp: u64,
    ) -> Option<u16> {
        let l = &mut self.logs[log.index()];
        if l.records.len() >= LOG_CAPACITY {
            let o = l.overflow.get_or_insert(Overflow {
                count: 0,
                first_timestamp: timestamp,
                last_timestamp: timestamp,
            });
            o.count = o.count.saturating_add(1);
            o.last_timestamp = timestamp;
            return None;
        }
        let handle = l.next_handle();
        record.header.length = RECORD_LEN as u8;
        let severity = log.index() as u32;
        record.header.set_flags((record.header.flags() & !flags::SEVERITY_MASK) | severity);
        record.header.handle = handle.into();
        record.header.timestamp = timestamp.into();
        l.records.push_back(record);
        Some(handle)
    }

    /// The oldest records of `log`, at most `max`.
    pub fn get(&self, log: EventLog, max: usize) -> Fetched {
        let l = &self.logs[log.index()];
        let records: Vec<EventRecord> = l.records.iter().take(max).copied().collect();
        Fetched { more: l.records.len() > records.len(), records, overflow: l.overflow }
    }

    /// Clears records as the request says: all of a log, or the ones its
    /// handles name (every handle must name a record, once; otherwise
    /// nothing is cleared). A log left empty forgets its overflow.
    pub fn clear(&mut self, request: &ClearRequest) -> Result<(), ClearError> {
        let (log, handles) = match request {
            ClearRequest::All(log) => {
                let l = &mut self.logs[log.index()];
                l.records.clear();
                l.overflow = None;
                return Ok(());
            }
            ClearRequest::Handles(log, handles) => (*log, handles),
        };
        let l = &mut self.logs[log.index()];
        for (i, &handle) in handles.iter().enumerate() {
            if handles[..i].contains(&handle) {
                return Err(ClearError::Repeated(handle));
            }
            if handle == 0 || !l.records.iter().any(|r| r.header.handle.get() == handle) {
                return Err(ClearError::NoSuchRecord { log, handle });
            }
        }
        l.records.retain(|r| !handles.contains(&r.header.handle.get()));
        if l.records.is_empty() {
            l.overflow = None;
        }
        Ok(())
    }

    /// The Event Status register: bit n set while log n holds records.
    pub fn status(&self) -> u32 {
        EventLog::ALL
            .iter()
            .filter(|log| !self.logs[log.index()].records.is_empty())
            .fold(0, |bits, log| bits | 1 << log.index())
    }

    pub fn len(&self, log: EventLog) -> usize {
        self.logs[log.index()].records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    fn record(tag: u8) -> EventRecord {
        let mut r = EventRecord::new_zeroed();
        r.header.uuid = pnm_protocol::events::uuid::GENERAL_MEDIA;
        r.data[0] = tag;
        r
    }

    #[test]
    fn a_full_log_counts_what_it_loses_and_forgets_it_once_emptied() {
        let mut logs = EventLogs::default();
        let log = EventLog::Failure;
        for i in 0..LOG_CAPACITY as u64 + 3 {
            logs.insert(log, record(i as u8), 1000 + i);
        }
        let got = logs.get(log, 10);
        assert_eq!(got.records.len(), 10);
        assert!(got.more);
        let o = got.overflow.unwrap();
        assert_eq!((o.count, o.first_timestamp, o.last_timestamp), (3, 1064, 1066));
        assert_eq!(logs.status(), 1 << 2);
        let bytes = got.encode();
        assert_eq!(bytes[0], GET_FLAG_OVERFLOW | GET_FLAG_MORE_RECORDS);
        assert_eq!(bytes.len(), 0x20 + 10 * RECORD_LEN);
        // The severity, handle and timestamp are the device's, whatever the
        // record said.
        let first = got.records[0];
        assert_eq!(first.header.flags() & flags::SEVERITY_MASK, 2);
        assert_eq!((first.header.handle.get(), first.header.timestamp.get()), (1, 1000));
        logs.clear(&ClearRequest::All(log)).unwrap();
        assert_eq!(logs.get(log, 10), Fetched { records: vec![], more: false, overflow: None });
        assert_eq!(logs.status(), 0);
    }

    #[test]
    fn a_clear_with_one_bad_handle_clears_nothing() {
        let mut logs = EventLogs::default();
        let log = EventLog::Informational;
        let a = logs.insert(log, record(1), 1).unwrap();
        let b = logs.insert(log, record(2), 2).unwrap();
        for bad in [vec![a, 0], vec![a, 99], vec![a, a]] {
            assert!(logs.clear(&ClearRequest::Handles(log, bad)).is_err());
            assert_eq!(logs.len(log), 2);
        }
        // Another log's handle is not this log's.
        let c = logs.insert(EventLog::Fatal, record(3), 3).unwrap();
        assert_eq!(c, 1);
        logs.clear(&ClearRequest::Handles(log, vec![b])).unwrap();
        assert_eq!(logs.get(log, 8).records[0].data[0], 1);
        assert_eq!(logs.status(), 1 << 0 | 1 << 3);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8),
        ClearAll(u8),
        ClearHandles(u8, Vec<u16>),
        ClearFirst(u8, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Mostly two logs, so they fill up and overflow; clears of up to
            // a whole log, so full logs also empty by handles.
            40 => (0u8..4, any::<u8>()).prop_map(|(l, t)| Op::Insert(l % 2 + l / 3, t)),
            1 => (0u8..4).prop_map(Op::ClearAll),
            1 => (0u8..4, proptest::collection::vec(0u16..80, 0..4)).prop_map(|(l, h)| Op::ClearHandles(l, h)),
            2 => (0u8..4, 0usize..80).prop_map(|(l, n)| Op::ClearFirst(l, n)),
        ]
    }

    /// The model of one log: (handle, tag) in order, the last handle
    /// given, records lost to overflow.
    type ModelLog = (Vec<(u16, u8)>, u16, u16);

    proptest! {
        /// Against a naive model: per log a list of (handle, tag) and an
        /// overflow count; handles are every insert's running number.
        #[test]
        fn behaves_like_a_list_per_log(ops in proptest::collection::vec(op(), 0..800)) {
            let mut logs = EventLogs::default();
            let mut model: [ModelLog; 4] = Default::default();
            for (t, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(l, tag) => {
                        let log = EventLog::from_wire(l).unwrap();
                        let (list, last, lost) = &mut model[usize::from(l)];
                        let got = logs.insert(log, record(tag), t as u64);
                        if list.len() < LOG_CAPACITY {
                            *last += 1;
                            list.push((*last, tag));
                            prop_assert_eq!(got, Some(*last));
                        } else {
                            *lost += 1;
                            prop_assert_eq!(got, None);
                        }
                    }
                    Op::ClearAll(l) => {
                        logs.clear(&ClearRequest::All(EventLog::from_wire(l).unwrap())).unwrap();
                        model[usize::from(l)].0.clear();
                        model[usize::from(l)].2 = 0;
                    }
                    Op::ClearHandles(l, handles) => {
                        let log = EventLog::from_wire(l).unwrap();
                        let (list, _, lost) = &mut model[usize::from(l)];
                        let valid = handles.iter().enumerate().all(|(i, h)| {
                            !handles[..i].contains(h) && list.iter().any(|(x, _)| x == h)
                        });
                        let result = logs.clear(&ClearRequest::Handles(log, handles.clone()));
                        prop_assert_eq!(result.is_ok(), valid);
                        if valid {
                            list.retain(|(h, _)| !handles.contains(h));
                            if list.is_empty() {
                                *lost = 0;
                            }
                        }
                    }
                    Op::ClearFirst(l, n) => {
                        let log = EventLog::from_wire(l).unwrap();
                        let handles: Vec<u16> =
                            logs.get(log, n).records.iter().map(|r| r.header.handle.get()).collect();
                        logs.clear(&ClearRequest::Handles(log, handles.clone())).unwrap();
                        let (list, _, lost) = &mut model[usize::from(l)];
                        list.retain(|(h, _)| !handles.contains(h));
                        if list.is_empty() {
                            *lost = 0;
                        }
                    }
                }
                for log in EventLog::ALL {
                    let (list, _, lost) = &model[log.index()];
                    let got = logs.get(log, usize::MAX);
                    let seen: Vec<(u16, u8)> =
                        got.records.iter().map(|r| (r.header.handle.get(), r.data[0])).collect();
                    prop_assert_eq!(&seen, list);
                    prop_assert_eq!(got.overflow.map_or(0, |o| o.count), *lost);
                    prop_assert_eq!(logs.status() & (1 << log.index()) != 0, !list.is_empty());
                }
            }
        }
    }
}
