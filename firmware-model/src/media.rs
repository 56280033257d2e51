//! The poison list: which 64-byte lines of device DRAM fail every read.
//!
//! Kept as disjoint ranges of lines, each with the source of its error;
//! adjacent ranges of one source merge. At most
//! [`POISON_LIST_MAX_RECORDS`] ranges are held: an injection that would
//! need more is refused (Inject Poison Limit Reached), and an error the
//! device finds when the list is full only sets the overflow mark (the line
//! still fails reads: its integrity check keeps failing). The list is saved
//! in device DRAM ([`encode_table`]) so poison outlives a device restart.

use std::collections::BTreeMap;
use std::ops::Range;

use pnm_protocol::media::{MediaErrorRecord, POISON_LIST_MAX_RECORDS, PoisonSource};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of the saved list in DRAM: a header and every record.
pub const TABLE_BYTES: u64 = 0x20 + 16 * POISON_LIST_MAX_RECORDS as u64;
const TABLE_MAGIC: u32 = u32::from_le_bytes(*b"PNMP");

/// The list would need more records than it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the poison list is full ({POISON_LIST_MAX_RECORDS} records)")]
pub struct PoisonListFull;

/// One poisoned range: lines `lines`, from `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    pub lines: Range<u64>,
    pub source: PoisonSource,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoisonList {
    /// First line -> (end line, source); disjoint.
    ranges: BTreeMap<u64, (u64, PoisonSource)>,
    /// Device timestamp of the first overflow, if the list overflowed.
    overflow: Option<u64>,
}

impl PoisonList {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// When the list first overflowed (device timestamp).
    pub fn overflowed_at(&self) -> Option<u64> {
        self.overflow
    }

    /// Marks the list overflowed at `now` (first time only).
    pub fn mark_overflow(&mut self, now: u64) {
        self.overflow.get_or_insert(now);
    }

    /// Poisons `lines` from `source`. Lines already poisoned keep their
    /// record. Nothing changes if the list would need more records than
    /// it may hold.
    pub fn add(&mut self, lines: Range<u64>, source: PoisonSource) -> Result<(), PoisonListFull> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut next = self.clone();
        let gaps: Vec<Range<u64>> = next.gaps(lines.clone());
        for gap in gaps {
            next.ranges.insert(gap.start, (gap.end, source));
        }
        next.merge_around(lines);
        if next.ranges.len() > POISON_LIST_MAX_RECORDS {
            return Err(PoisonListFull);
        }
        *self = next;
        Ok(())
    }

    /// Clears line `line`, splitting its range. Returns whether it was
    /// poisoned. A split that needs a record the list cannot hold drops the
    /// far part and marks the overflow (the bytes are unaffected; a scan
    /// finds them again if they are still bad).
    pub fn clear(&mut self, line: u64, now: u64) -> bool {
        let Some((&start, &(end, source))) = self.ranges.range(..=line).next_back() else {
            return false;
        };
        if line >= end {
            return false;
        }
        self.ranges.remove(&start);
        if start < line {
            self.ranges.insert(start, (line, source));
        }
        if line + 1 < end {
            if self.ranges.len() < POISON_LIST_MAX_RECORDS {
                self.ranges.insert(line + 1, (end, source));
            } else {
                self.mark_overflow(now);
            }
        }
        true
    }

    /// The poisoned parts of `lines`, ascending.
    pub fn within(&self, lines: Range<u64>) -> impl Iterator<Item = Poisoned> + '_ {
        let first = self
            .ranges
            .range(..=lines.start)
            .next_back()
            .filter(|(_, (end, _))| *end > lines.start)
            .map(|(&s, _)| s)
            .unwrap_or(lines.start);
        let end = lines.end;
        self.ranges.range(first..end).filter_map(move |(&s, &(e, source))| {
            let clipped = s.max(lines.start)..e.min(end);
            (!clipped.is_empty()).then_some(Poisoned { lines: clipped, source })
        })
    }

    /// Whether any of `lines` is poisoned.
    pub fn touches(&self, lines: Range<u64>) -> bool {
        !self.is_empty() && self.within(lines).next().is_some()
    }

    /// Every record.
    pub fn all(&self) -> impl Iterator<Item = Poisoned> + '_ {
        self.ranges.iter().map(|(&s, &(e, source))| Poisoned { lines: s..e, source })
    }

    /// The parts of `lines` not poisoned.
    fn gaps(&self, lines: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = lines.start;
        for p in self.within(lines.clone()) {
            if p.lines.start > at {
                gaps.push(at..p.lines.start);
            }
            at = p.lines.end;
        }
        if at < lines.end {
            gaps.push(at..lines.end);
        }
        gaps
    }

    /// Merges adjacent ranges of one source around `lines`.
    fn merge_around(&mut self, lines: Range<u64>) {
        let from = self.ranges.range(..lines.start).next_back().map_or(lines.start, |(&s, _)| s);
        let keys: Vec<u64> = self.ranges.range(from..=lines.end).map(|(&s, _)| s).collect();
        for pair in keys.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (Some(&(a_end, a_src)), Some(&(b_end, b_src))) =
                (self.ranges.get(&a), self.ranges.get(&b))
            else {
                continue;
            };
            // A record's length is a u32 of lines on the wire.
            if a_end == b && a_src == b_src && b_end - a <= u64::from(u32::MAX) {
                self.ranges.remove(&b);
                self.ranges.insert(a, (b_end, a_src));
                // `a` absorbed `b`: the next pair starts from `a` again.
                return self.merge_around(lines);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct TableHeader {
    magic: U32,
    count: U32,
    /// Integrity check of the records (integrity::line_check of each 64
    /// bytes, summed), so a torn save is found and not trusted.
    check: U32,
    overflowed: U32,
    overflow_timestamp: U64,
    reserved: U64,
}

const _: () = assert!(size_of::<TableHeader>() == 0x20);

fn records_check(records: &[u8]) -> u32 {
    records
        .chunks(64)
        .enumerate()
        .fold(0u32, |sum, (i, c)| sum.wrapping_add(crate::integrity::line_check(c, i as u64)))
}

/// The list as saved in DRAM ([`TABLE_BYTES`]).
pub fn encode_table(list: &PoisonList) -> Vec<u8> {
    let mut records = Vec::with_capacity(16 * list.len());
    for p in list.all() {
        let lines = (p.lines.end - p.lines.start) as u32;
        records.extend_from_slice(
            MediaErrorRecord::new(p.lines.start * 64, lines, p.source).as_bytes(),
        );
    }
    let header = TableHeader {
        magic: TABLE_MAGIC.into(),
        count: (list.len() as u32).into(),
        check: records_check(&records).into(),
        overflowed: u32::from(list.overflow.is_some()).into(),
        overflow_timestamp: list.overflow.unwrap_or(0).into(),
        reserved: 0.into(),
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&records);
    out.resize(TABLE_BYTES as usize, 0);
    out
}

/// Why a saved list was not loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("the saved poison list is damaged (its {0} is wrong)")]
    Damaged(&'static str),
}

/// The saved list in `table` (None: never saved, all zero).
pub fn decode_table(table: &[u8]) -> Result<Option<PoisonList>, TableError> {
    if table.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let (header, rest) =
        TableHeader::read_from_prefix(table).map_err(|_| TableError::Damaged("length"))?;
    if header.magic.get() != TABLE_MAGIC {
        return Err(TableError::Damaged("magic"));
    }
    let count = header.count.get() as usize;
    if count > POISON_LIST_MAX_RECORDS || rest.len() < 16 * count {
        return Err(TableError::Damaged("count"));
    }
    let records = &rest[..16 * count];
    if records_check(records) != header.check.get() {
        return Err(TableError::Damaged("check"));
    }
    let mut list = PoisonList::default();
    let mut last_end = 0;
    for chunk in records.chunks_exact(16) {
        let r =
            MediaErrorRecord::read_from_bytes(chunk).map_err(|_| TableError::Damaged("record"))?;
        let source = r.source().ok_or(TableError::Damaged("source"))?;
        let start = r.dpa() / 64;
        let end = start + u64::from(r.length.get());
        if r.length.get() == 0 || start < last_end {
            return Err(TableError::Damaged("order"));
        }
        last_end = end;
        list.ranges.insert(start, (end, source));
    }
    if header.overflowed.get() != 0 {
        list.overflow = Some(header.overflow_timestamp.get());
    }
    Ok(Some(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn adds_merge_and_clears_split() {
        let mut list = PoisonList::default();
        list.add(10..12, PoisonSource::Injected).unwrap();
        list.add(12..14, PoisonSource::Injected).unwrap();
        list.add(11..20, PoisonSource::Internal).unwrap();
        let all: Vec<_> = list.all().map(|p| (p.lines, p.source)).collect();
        assert_eq!(all, [(10..14, PoisonSource::Injected), (14..20, PoisonSource::Internal)]);
        assert!(list.clear(12, 5));
        assert!(!list.clear(12, 5));
        let all: Vec<_> = list.all().map(|p| p.lines).collect();
        assert_eq!(all, [10..12, 13..14, 14..20]);
        assert!(list.touches(0..11) && !list.touches(0..10) && !list.touches(12..13));
        let within: Vec<_> = list.within(11..15).map(|p| p.lines).collect();
        assert_eq!(within, [11..12, 13..14, 14..15]);
    }

    #[test]
    fn a_full_list_refuses_injections_and_overflows_on_splits() {
        let mut list = PoisonList::default();
        for i in 0..POISON_LIST_MAX_RECORDS as u64 {
            list.add(3 * i..3 * i + 2, PoisonSource::Injected).unwrap();
        }
        assert_eq!(list.add(10_000..10_001, PoisonSource::Injected), Err(PoisonListFull));
        // Joining two ranges needs no new record.
        list.add(2..3, PoisonSource::Injected).unwrap();
        assert_eq!(list.len(), POISON_LIST_MAX_RECORDS - 1);
        list.add(10_000..10_001, PoisonSource::Injected).unwrap();
        assert_eq!(list.len(), POISON_LIST_MAX_RECORDS);
        // Clearing a range's first line needs no new record.
        assert!(list.clear(30, 77));
        assert_eq!(list.overflowed_at(), None);
        list.add(30..31, PoisonSource::Injected).unwrap();
        // Splitting the merged 0..5 at 1 needs a record the full list lacks:
        // the far part is dropped and the overflow marked.
        assert!(list.clear(1, 78));
        assert_eq!(list.overflowed_at(), Some(78));
        assert!(list.touches(0..1) && !list.touches(1..5));
    }

    #[test]
    fn the_saved_table_round_trips_and_damage_is_found() {
        let mut list = PoisonList::default();
        list.add(1..4, PoisonSource::Injected).unwrap();
        list.add(100..101, PoisonSource::Internal).unwrap();
        list.mark_overflow(9);
        let table = encode_table(&list);
        assert_eq!(table.len() as u64, TABLE_BYTES);
        assert_eq!(decode_table(&table), Ok(Some(list)));
        assert_eq!(decode_table(&vec![0; TABLE_BYTES as usize]), Ok(None));
        let mut torn = table.clone();
        torn[0x20 + 3] ^= 1;
        assert_eq!(decode_table(&torn), Err(TableError::Damaged("check")));
    }

    proptest! {
        /// The list holds exactly the lines added and not cleared, each with
        /// the source of its first add, against a set of lines.
        #[test]
        fn matches_a_set_of_lines(ops in proptest::collection::vec(
            (any::<bool>(), 0u64..200, 1u64..20, any::<bool>()), 1..60)
        ) {
            let mut list = PoisonList::default();
            let mut model: BTreeSet<u64> = BTreeSet::new();
            for (add, start, len, internal) in ops {
                if add {
                    let source =
                        if internal { PoisonSource::Internal } else { PoisonSource::Injected };
                    list.add(start..start + len, source).unwrap();
                    model.extend(start..start + len);
                } else {
                    prop_assert_eq!(list.clear(start, 0), model.remove(&start));
                }
                let held: BTreeSet<u64> = list.all().flat_map(|p| p.lines).collect();
                prop_assert_eq!(&held, &model);
                let q = start.saturating_sub(5)..start + 5;
                prop_assert_eq!(list.touches(q.clone()), model.range(q).next().is_some());
            }
            prop_assert_eq!(decode_table(&encode_table(&list)).unwrap(), Some(list));
        }
    }
}
