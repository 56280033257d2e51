//! Typed queue commands (PROTOCOL.md §6.1): what each submission entry
//! field means, per opcode, written once. The host builds a
//! [`QueueCommand`] and [`encode`](QueueCommand::encode)s it; the device
//! [`decode`](QueueCommand::decode)s every entry it takes into one, and
//! refuses with the decoder's return code what does not decode.
//!
//! Decoding checks the wire: opcodes, codes (dtype, aggregation), flags and
//! field widths. What depends on the device (firmware limits, sequences,
//! buffer bounds) its handlers check. Fields a command does not use, and
//! reserved bits, are ignored, as the spec ignores reserved fields.

use std::fmt;

use super::{
    Aggregation, Dtype, FLAG_PAGE_SELECTION, FLAG_SKIP_BAD_ROWS, KV_COMMIT_ABORT, KV_COMMIT_DEFER,
    QueueOpcode, SubmissionEntry,
};
use crate::ReturnCode;

/// A host buffer a command names: a region offset (inside the host DMA
/// window, checked by the device) and a length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostBuffer {
    pub addr: u64,
    pub len: u32,
}

/// One stream of K and V rows: a (sequence, layer, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stream {
    pub seq: u32,
    pub layer: u16,
    pub head: u16,
}

/// KV_CREATE: a new sequence of `layers x heads` streams of rows of
/// `head_dim` elements of `dtype`. R0 = sequence id, R1 = tokens per page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCreate {
    pub layers: u16,
    pub heads: u16,
    /// Arg0; the wire field is 32 bits, a head_dim over 65535 is refused.
    pub head_dim: u16,
    /// Arg1.
    pub dtype: Dtype,
}

/// KV_APPEND: reserve `tokens` at the end of `seq`; `page_map` receives
/// the [`PageMapEntry`](super::PageMapEntry)s of every page they touch.
/// R0 = first new token, R1 = first page in the map, R2 = pages in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvAppend {
    pub seq: u32,
    pub tokens: u32,
    pub page_map: HostBuffer,
}

/// What a KV_COMMIT does with the queue's reservation (its Flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitMode {
    /// Make the tokens valid now.
    #[default]
    Publish,
    /// Fold their keys into the page bounds, keep them invalid until a
    /// later Publish ([`KV_COMMIT_DEFER`]).
    Defer,
    /// Give up the reservation; the count is ignored ([`KV_COMMIT_ABORT`]).
    Abort,
}

impl CommitMode {
    pub const fn flags(self) -> u8 {
        match self {
            Self::Publish => 0,
            Self::Defer => KV_COMMIT_DEFER,
            Self::Abort => KV_COMMIT_ABORT,
        }
    }

    pub const fn from_flags(flags: u8) -> Option<Self> {
        match flags {
            0 => Some(Self::Publish),
            KV_COMMIT_DEFER => Some(Self::Defer),
            KV_COMMIT_ABORT => Some(Self::Abort),
            _ => None,
        }
    }
}

/// KV_COMMIT: make `seq`'s tokens valid up to `valid_tokens` (a count, not
/// a delta). Only the queue that reserved them may. R0 = R2 = tokens valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCommit {
    pub seq: u32,
    pub valid_tokens: u32,
    pub mode: CommitMode,
}

/// KV_FREE: free `seq` and its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFree {
    pub seq: u32,
}

/// KV_LIST: up to `max_entries` [`SequenceInfo`](super::SequenceInfo)s
/// into `out`. R0 = live sequences, R1 = entries written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvList {
    pub max_entries: u32,
    pub out: HostBuffer,
}

/// KV_MAP: the page map of pages `[first_page, first_page + pages)` of
/// `seq` into `out`. R0 = pages written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMap {
    pub seq: u32,
    pub first_page: u32,
    pub pages: u32,
    pub out: HostBuffer,
}

/// Query-aware page selection for a Top-K (the Page Selection field with
/// [`FLAG_PAGE_SELECTION`]): score only the pages whose key bounds promise
/// the most, within a token budget that includes the always-kept first
/// (sink) and last (recent) pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSelection {
    /// [31:0]
    pub budget_tokens: u32,
    /// [39:32]
    pub sink_pages: u8,
    /// [47:40]
    pub recent_pages: u8,
}

impl PageSelection {
    /// The Page Selection field.
    pub const fn encode(self) -> u64 {
        self.budget_tokens as u64
            | (self.sink_pages as u64) << 32
            | (self.recent_pages as u64) << 40
    }

    /// Reads the Page Selection field ([63:48] reserved).
    pub const fn decode(field: u64) -> Self {
        Self {
            budget_tokens: field as u32,
            sink_pages: (field >> 32) as u8,
            recent_pages: (field >> 40) as u8,
        }
    }
}

/// TOPK and TOPK_GATHER: score every valid token of `stream` (or the pages
/// `selection` picks) against `group` queries of `query_dtype` in
/// `queries`, and write the best `k` to `results` as a
/// [`TopkLayout`](super::TopkLayout) (with rows for TOPK_GATHER).
/// R0 = results, R1 = tokens scored, R2 = tokens in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topk {
    pub stream: Stream,
    /// Count.
    pub k: u32,
    /// Arg0: queries in the GQA group.
    pub group: u32,
    /// Arg1 [7:0].
    pub query_dtype: Dtype,
    /// Arg1 [15:8]; [31:16] must be 0.
    pub aggregation: Aggregation,
    /// Flags bit 0 and the Page Selection field.
    pub selection: Option<PageSelection>,
    /// Flags bit 1 ([`FLAG_SKIP_BAD_ROWS`]): tokens whose rows lie on bad
    /// media are left out and counted (R2 [63:32]) instead of failing the
    /// command with Media Error.
    pub skip_bad_rows: bool,
    /// Buffer 0: exactly `group x head_dim` queries.
    pub queries: HostBuffer,
    /// Buffer 1.
    pub results: HostBuffer,
}

/// GATHER: the K and V rows of the `rows` u32 token indices in `indices`
/// into `out` as a [`GatherLayout`](super::GatherLayout). R0 = rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    pub stream: Stream,
    /// Count.
    pub rows: u32,
    pub indices: HostBuffer,
    pub out: HostBuffer,
}

/// A queue command, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueCommand {
    Nop,
    KvCreate(KvCreate),
    KvAppend(KvAppend),
    KvCommit(KvCommit),
    KvFree(KvFree),
    KvList(KvList),
    KvMap(KvMap),
    Topk(Topk),
    Gather(Gather),
    TopkGather(Topk),
}

/// A submission entry field a decoder found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqeField {
    Flags,
    /// KV_CREATE's Arg0.
    HeadDim,
    /// KV_CREATE's Arg1.
    Dtype,
    /// TOPK's Arg1 [7:0].
    QueryDtype,
    /// TOPK's Arg1 [31:8].
    Aggregation,
}

impl fmt::Display for SqeField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flags => "flags",
            Self::HeadDim => "head_dim (arg0)",
            Self::Dtype => "dtype (arg1)",
            Self::QueryDtype => "query dtype (arg1 [7:0])",
            Self::Aggregation => "aggregation (arg1 [31:8])",
        })
    }
}

/// Why a submission entry is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("opcode {0} is not a queue command")]
    UnknownOpcode(QueueOpcode),
    #[error("{opcode}: {field} {value:#x} is not defined")]
    InvalidField { opcode: QueueOpcode, field: SqeField, value: u64 },
}

impl DecodeError {
    /// The return code the completion carries.
    pub const fn return_code(&self) -> ReturnCode {
        match self {
            Self::UnknownOpcode(_) => ReturnCode::UNSUPPORTED,
            Self::InvalidField { .. } => ReturnCode::INVALID_INPUT,
        }
    }
}

impl QueueCommand {
    pub const fn opcode(&self) -> QueueOpcode {
        match self {
            Self::Nop => QueueOpcode::NOP,
            Self::KvCreate(_) => QueueOpcode::KV_CREATE,
            Self::KvAppend(_) => QueueOpcode::KV_APPEND,
            Self::KvCommit(_) => QueueOpcode::KV_COMMIT,
            Self::KvFree(_) => QueueOpcode::KV_FREE,
            Self::KvList(_) => QueueOpcode::KV_LIST,
            Self::KvMap(_) => QueueOpcode::KV_MAP,
            Self::Topk(_) => QueueOpcode::TOPK,
            Self::Gather(_) => QueueOpcode::GATHER,
            Self::TopkGather(_) => QueueOpcode::TOPK_GATHER,
        }
    }

    /// The submission entry for this command; every field it does not use
    /// is 0.
    pub fn encode(&self, command_id: u16) -> SubmissionEntry {
        let mut e = SubmissionEntry {
            opcode: self.opcode(),
            command_id: command_id.into(),
            ..Default::default()
        };
        let set_stream = |e: &mut SubmissionEntry, s: Stream| {
            e.seq = s.seq.into();
            e.layer = s.layer.into();
            e.head = s.head.into();
        };
        let set_buf0 = |e: &mut SubmissionEntry, b: HostBuffer| {
            e.buf0_addr = b.addr.into();
            e.buf0_len = b.len.into();
        };
        let set_buf1 = |e: &mut SubmissionEntry, b: HostBuffer| {
            e.buf1_addr = b.addr.into();
            e.buf1_len = b.len.into();
        };
        match *self {
            Self::Nop => {}
            Self::KvCreate(c) => {
                e.layer = c.layers.into();
                e.head = c.heads.into();
                e.arg0 = u32::from(c.head_dim).into();
                e.arg1 = c.dtype.code().into();
            }
            Self::KvAppend(c) => {
                e.seq = c.seq.into();
                e.count = c.tokens.into();
                set_buf0(&mut e, c.page_map);
            }
            Self::KvCommit(c) => {
                e.seq = c.seq.into();
                e.count = c.valid_tokens.into();
                e.flags = c.mode.flags();
            }
            Self::KvFree(c) => e.seq = c.seq.into(),
            Self::KvList(c) => {
                e.count = c.max_entries.into();
                set_buf0(&mut e, c.out);
            }
            Self::KvMap(c) => {
                e.seq = c.seq.into();
                e.arg0 = c.first_page.into();
                e.count = c.pages.into();
                set_buf0(&mut e, c.out);
            }
            Self::Topk(c) | Self::TopkGather(c) => {
                set_stream(&mut e, c.stream);
                e.count = c.k.into();
                e.arg0 = c.group.into();
                e.arg1 = (c.query_dtype.code() | u32::from(c.aggregation.code()) << 8).into();
                if let Some(selection) = c.selection {
                    e.flags = FLAG_PAGE_SELECTION;
                    e.selection = selection.encode().into();
                }
                if c.skip_bad_rows {
                    e.flags |= FLAG_SKIP_BAD_ROWS;
                }
                set_buf0(&mut e, c.queries);
                set_buf1(&mut e, c.results);
            }
            Self::Gather(c) => {
                set_stream(&mut e, c.stream);
                e.count = c.rows.into();
                set_buf0(&mut e, c.indices);
                set_buf1(&mut e, c.out);
            }
        }
        e
    }

    /// Reads a submission entry the host wrote.
    pub fn decode(e: &SubmissionEntry) -> Result<Self, DecodeError> {
        let opcode = e.opcode;
        let invalid = |field, value: u64| DecodeError::InvalidField { opcode, field, value };
        let stream = Stream { seq: e.seq.get(), layer: e.layer.get(), head: e.head.get() };
        let buf0 = HostBuffer { addr: e.buf0_addr.get(), len: e.buf0_len.get() };
        let buf1 = HostBuffer { addr: e.buf1_addr.get(), len: e.buf1_len.get() };
        Ok(match opcode {
            QueueOpcode::NOP => Self::Nop,
            QueueOpcode::KV_CREATE => Self::KvCreate(KvCreate {
                layers: e.layer.get(),
                heads: e.head.get(),
                head_dim: u16::try_from(e.arg0.get())
                    .map_err(|_| invalid(SqeField::HeadDim, e.arg0.get().into()))?,
                dtype: Dtype::from_code(e.arg1.get())
                    .ok_or_else(|| invalid(SqeField::Dtype, e.arg1.get().into()))?,
            }),
            QueueOpcode::KV_APPEND => {
                Self::KvAppend(KvAppend { seq: e.seq.get(), tokens: e.count.get(), page_map: buf0 })
            }
            QueueOpcode::KV_COMMIT => Self::KvCommit(KvCommit {
                seq: e.seq.get(),
                valid_tokens: e.count.get(),
                mode: CommitMode::from_flags(e.flags)
                    .ok_or_else(|| invalid(SqeField::Flags, e.flags.into()))?,
            }),
            QueueOpcode::KV_FREE => Self::KvFree(KvFree { seq: e.seq.get() }),
            QueueOpcode::KV_LIST => Self::KvList(KvList { max_entries: e.count.get(), out: buf0 }),
            QueueOpcode::KV_MAP => Self::KvMap(KvMap {
                seq: e.seq.get(),
                first_page: e.arg0.get(),
                pages: e.count.get(),
                out: buf0,
            }),
            QueueOpcode::TOPK | QueueOpcode::TOPK_GATHER => {
                let arg1 = e.arg1.get();
                let query_dtype = Dtype::from_code(arg1 & 0xFF)
                    .ok_or_else(|| invalid(SqeField::QueryDtype, (arg1 & 0xFF).into()))?;
                let aggregation = u8::try_from(arg1 >> 8)
                    .ok()
                    .and_then(Aggregation::from_code)
                    .ok_or_else(|| invalid(SqeField::Aggregation, (arg1 >> 8).into()))?;
                if e.flags & !(FLAG_PAGE_SELECTION | FLAG_SKIP_BAD_ROWS) != 0 {
                    return Err(invalid(SqeField::Flags, e.flags.into()));
                }
                let selection = (e.flags & FLAG_PAGE_SELECTION != 0)
                    .then(|| PageSelection::decode(e.selection.get()));
                let topk = Topk {
                    stream,
                    k: e.count.get(),
                    group: e.arg0.get(),
                    query_dtype,
                    aggregation,
                    selection,
                    skip_bad_rows: e.flags & FLAG_SKIP_BAD_ROWS != 0,
                    queries: buf0,
                    results: buf1,
                };
                if opcode == QueueOpcode::TOPK { Self::Topk(topk) } else { Self::TopkGather(topk) }
            }
            QueueOpcode::GATHER => {
                Self::Gather(Gather { stream, rows: e.count.get(), indices: buf0, out: buf1 })
            }
            other => return Err(DecodeError::UnknownOpcode(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dtype() -> impl Strategy<Value = Dtype> {
        prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::Bf16)]
    }

    fn buffer() -> impl Strategy<Value = HostBuffer> {
        (any::<u64>(), any::<u32>()).prop_map(|(addr, len)| HostBuffer { addr, len })
    }

    fn stream() -> impl Strategy<Value = Stream> {
        (any::<u32>(), any::<u16>(), any::<u16>()).prop_map(|(seq, layer, head)| Stream {
            seq,
            layer,
            head,
        })
    }

    fn topk() -> impl Strategy<Value = Topk> {
        let selection = proptest::option::of((any::<u32>(), any::<u8>(), any::<u8>()).prop_map(
            |(budget_tokens, sink_pages, recent_pages)| PageSelection {
                budget_tokens,
                sink_pages,
                recent_pages,
            },
        ));
        let aggregation = prop_oneof![Just(Aggregation::Max), Just(Aggregation::Mean)];
        let head = (stream(), any::<u32>(), any::<u32>(), dtype(), aggregation);
        (head, selection, any::<bool>(), buffer(), buffer()).prop_map(
            |((stream, k, group, query_dtype, aggregation), selection, skip_bad_rows, q, r)| Topk {
                stream,
                k,
                group,
                query_dtype,
                aggregation,
                selection,
                skip_bad_rows,
                queries: q,
                results: r,
            },
        )
    }

    fn command() -> impl Strategy<Value = QueueCommand> {
        let mode = prop_oneof![
            Just(CommitMode::Publish),
            Just(CommitMode::Defer),
            Just(CommitMode::Abort)
        ];
        prop_oneof![
            Just(QueueCommand::Nop),
            (any::<u16>(), any::<u16>(), any::<u16>(), dtype()).prop_map(
                |(layers, heads, head_dim, dtype)| QueueCommand::KvCreate(KvCreate {
                    layers,
                    heads,
                    head_dim,
                    dtype
                })
            ),
            (any::<u32>(), any::<u32>(), buffer()).prop_map(|(seq, tokens, page_map)| {
                QueueCommand::KvAppend(KvAppend { seq, tokens, page_map })
            }),
            (any::<u32>(), any::<u32>(), mode).prop_map(|(seq, valid_tokens, mode)| {
                QueueCommand::KvCommit(KvCommit { seq, valid_tokens, mode })
            }),
            any::<u32>().prop_map(|seq| QueueCommand::KvFree(KvFree { seq })),
            (any::<u32>(), buffer())
                .prop_map(|(max_entries, out)| QueueCommand::KvList(KvList { max_entries, out })),
            (any::<u32>(), any::<u32>(), any::<u32>(), buffer()).prop_map(
                |(seq, first_page, pages, out)| QueueCommand::KvMap(KvMap {
                    seq,
                    first_page,
                    pages,
                    out
                })
            ),
            topk().prop_map(QueueCommand::Topk),
            topk().prop_map(QueueCommand::TopkGather),
            (stream(), any::<u32>(), buffer(), buffer()).prop_map(
                |(stream, rows, indices, out)| {
                    QueueCommand::Gather(Gather { stream, rows, indices, out })
                }
            ),
        ]
    }

    fn entry() -> impl Strategy<Value = SubmissionEntry> {
        let opcode = prop_oneof![
            3 => proptest::sample::select(QueueOpcode::ALL.to_vec()),
            1 => any::<u8>().prop_map(QueueOpcode),
        ];
        let small = prop_oneof![3 => 0..4u32, 1 => any::<u32>()];
        (
            (opcode, prop_oneof![3 => 0..4u8, 1 => any::<u8>()], any::<u16>(), any::<u32>()),
            (any::<u16>(), any::<u16>(), any::<u32>(), small.clone(), small),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        )
            .prop_map(|((op, flags, cid, seq), (layer, head, count, arg0, arg1), bufs)| {
                let (b0, b1, selection, l0, l1) = bufs;
                let mut e = SubmissionEntry { opcode: op, flags, ..Default::default() };
                e.command_id = cid.into();
                e.seq = seq.into();
                e.layer = layer.into();
                e.head = head.into();
                e.count = count.into();
                e.arg0 = arg0.into();
                e.arg1 = arg1.into();
                e.buf0_addr = b0.into();
                e.buf1_addr = b1.into();
                e.selection = selection.into();
                e.buf0_len = l0.into();
                e.buf1_len = l1.into();
                e
            })
    }

    proptest! {
        /// The decoder is the encoder's inverse.
        #[test]
        fn every_command_decodes_to_itself(command in command(), cid in any::<u16>()) {
            let entry = command.encode(cid);
            prop_assert_eq!(entry.command_id.get(), cid);
            prop_assert_eq!(QueueCommand::decode(&entry), Ok(command));
        }

        /// Whatever a host writes decodes to a command, or to an error with
        /// the spec's code for it; what decodes encodes back to an entry
        /// that means the same, differing only in fields the command does
        /// not use.
        #[test]
        fn every_entry_decodes_or_is_refused_with_its_code(e in entry()) {
            match QueueCommand::decode(&e) {
                Ok(command) => {
                    let again = command.encode(e.command_id.get());
                    prop_assert_eq!(QueueCommand::decode(&again), Ok(command));
                    prop_assert_eq!(again.opcode, e.opcode);
                }
                Err(DecodeError::UnknownOpcode(op)) => {
                    prop_assert!(op.name().is_none());
                }
                Err(err @ DecodeError::InvalidField { .. }) => {
                    prop_assert_eq!(err.return_code(), ReturnCode::INVALID_INPUT);
                }
            }
        }
    }

    #[test]
    fn fields_are_where_the_spec_puts_them() {
        let topk = Topk {
            stream: Stream { seq: 7, layer: 3, head: 2 },
            k: 64,
            group: 4,
            query_dtype: Dtype::Bf16,
            aggregation: Aggregation::Mean,
            selection: Some(PageSelection { budget_tokens: 4096, sink_pages: 1, recent_pages: 2 }),
            skip_bad_rows: false,
            queries: HostBuffer { addr: 0x10000, len: 1024 },
            results: HostBuffer { addr: 0x20000, len: 512 },
        };
        let e = QueueCommand::TopkGather(topk).encode(9);
        assert_eq!(e.opcode, QueueOpcode::TOPK_GATHER);
        assert_eq!((e.seq.get(), e.layer.get(), e.head.get()), (7, 3, 2));
        assert_eq!((e.count.get(), e.arg0.get(), e.arg1.get()), (64, 4, 0x0102));
        assert_eq!((e.flags, e.selection.get()), (FLAG_PAGE_SELECTION, 0x0201_0000_1000));
        assert_eq!((e.buf0_addr.get(), e.buf0_len.get()), (0x10000, 1024));
        assert_eq!((e.buf1_addr.get(), e.buf1_len.get()), (0x20000, 512));
        let commit = KvCommit { seq: 1, valid_tokens: 5, mode: CommitMode::Defer };
        assert_eq!(QueueCommand::KvCommit(commit).encode(0).flags, KV_COMMIT_DEFER);
    }

    #[test]
    fn undefined_codes_and_flags_are_refused_with_invalid_input() {
        let topk = |f: &dyn Fn(&mut SubmissionEntry)| {
            let mut e = SubmissionEntry { opcode: QueueOpcode::TOPK, ..Default::default() };
            f(&mut e);
            QueueCommand::decode(&e).map(|_| ()).map_err(|e| e.return_code())
        };
        assert_eq!(topk(&|_| {}), Ok(()));
        assert_eq!(topk(&|e| e.arg1 = 7.into()), Err(ReturnCode::INVALID_INPUT));
        assert_eq!(topk(&|e| e.arg1 = (2 << 8).into()), Err(ReturnCode::INVALID_INPUT));
        assert_eq!(topk(&|e| e.arg1 = (1 << 16).into()), Err(ReturnCode::INVALID_INPUT));
        assert_eq!(topk(&|e| e.flags = 0x80), Err(ReturnCode::INVALID_INPUT));
        assert_eq!(topk(&|e| e.opcode = QueueOpcode(0x7F)), Err(ReturnCode::UNSUPPORTED));
        let commit = SubmissionEntry {
            opcode: QueueOpcode::KV_COMMIT,
            flags: KV_COMMIT_DEFER | KV_COMMIT_ABORT,
            ..Default::default()
        };
        assert!(matches!(
            QueueCommand::decode(&commit),
            Err(DecodeError::InvalidField { field: SqeField::Flags, value: 3, .. })
        ));
        let mut create = SubmissionEntry { opcode: QueueOpcode::KV_CREATE, ..Default::default() };
        create.arg0 = 65536.into();
        assert!(matches!(
            QueueCommand::decode(&create),
            Err(DecodeError::InvalidField { field: SqeField::HeadDim, .. })
        ));
    }
}
