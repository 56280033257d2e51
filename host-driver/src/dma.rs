//! Host DMA buffers: chunks of the host DMA window obtained from the device
//! (Allocate DMA), carved into buffers by a first-fit allocator.

use std::collections::BTreeMap;

use pnm_protocol::commands::{AllocateDmaInput, DMA_GRANULE, DmaBufferAddr};
use pnm_protocol::{Opcode, RegionLayout, ReturnCode};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};
use crate::mailbox::MailboxClient;

/// Bytes asked of the device at a time (larger requests get their own chunk).
pub const CHUNK: u64 = 4 << 20;
/// Buffers are aligned to a cache line.
const ALIGN: u64 = 64;

/// A buffer in the host DMA window: region offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaBuf {
    pub addr: u64,
    pub len: u64,
}

#[derive(Debug)]
struct Chunk {
    addr: u64,
    len: u64,
    /// Free ranges: offset from the chunk start -> length.
    free: BTreeMap<u64, u64>,
}

/// The driver's DMA buffers.
#[derive(Debug)]
pub struct DmaPool {
    window: (u64, u64),
    chunks: Vec<Chunk>,
}

impl DmaPool {
    pub fn new(layout: &RegionLayout) -> Self {
        Self { window: (layout.dma_window_offset, layout.dma_window_size), chunks: Vec::new() }
    }

    /// A buffer of at least `len` bytes.
    pub fn alloc(&mut self, mailbox: &mut MailboxClient, len: u64) -> Result<DmaBuf> {
        let len = len.max(1).next_multiple_of(ALIGN);
        if let Some(buf) = self.carve(len) {
            return Ok(buf);
        }
        // A whole chunk if the window has room, else just what is needed.
        let exact = len.next_multiple_of(DMA_GRANULE);
        let mut size = len.max(CHUNK).next_multiple_of(DMA_GRANULE);
        let out = loop {
            let owner_pid = std::process::id().into();
            let input = AllocateDmaInput { size: size.into(), owner_pid, reserved: [0; 4] };
            match mailbox.execute(Opcode::ALLOCATE_DMA, input.as_bytes()) {
                Err(e)
                    if size > exact && e.return_code() == Some(ReturnCode::RESOURCES_EXHAUSTED) =>
                {
                    size = exact;
                }
                other => break other?,
            }
        };
        let addr = DmaBufferAddr::read_from_bytes(&out)
            .map_err(|_| Error::MalformedOutput {
                opcode: Opcode::ALLOCATE_DMA,
                reason: format!("{} bytes", out.len()),
            })?
            .addr
            .get();
        let (start, window_len) = self.window;
        if addr < start || addr.checked_add(size).is_none_or(|end| end > start + window_len) {
            return Err(Error::MalformedOutput {
                opcode: Opcode::ALLOCATE_DMA,
                reason: format!("buffer {addr:#x}+{size:#x} is outside the host DMA window"),
            });
        }
        self.chunks.push(Chunk { addr, len: size, free: BTreeMap::from([(0, size)]) });
        Ok(self.carve(len).expect("a fresh chunk fits the request"))
    }

    fn carve(&mut self, len: u64) -> Option<DmaBuf> {
        for chunk in &mut self.chunks {
            let found = chunk.free.iter().find(|&(_, &free)| free >= len).map(|(&o, &l)| (o, l));
            if let Some((offset, free)) = found {
                chunk.free.remove(&offset);
                if free > len {
                    chunk.free.insert(offset + len, free - len);
                }
                return Some(DmaBuf { addr: chunk.addr + offset, len });
            }
        }
        None
    }

    /// Returns a buffer to the pool, merging it with free neighbours.
    pub fn free(&mut self, buf: DmaBuf) {
        let Some(chunk) =
            self.chunks.iter_mut().find(|c| buf.addr >= c.addr && buf.addr < c.addr + c.len)
        else {
            debug_assert!(false, "buffer {buf:?} is not from this pool");
            return;
        };
        let mut offset = buf.addr - chunk.addr;
        let mut len = buf.len;
        if let Some((&next, &next_len)) = chunk.free.range(offset + len..).next()
            && next == offset + len
        {
            chunk.free.remove(&next);
            len += next_len;
        }
        if let Some((&prev, &prev_len)) = chunk.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            chunk.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        chunk.free.insert(offset, len);
    }

    /// Gives every chunk back to the device.
    pub fn release(&mut self, mailbox: &mut MailboxClient) {
        for chunk in self.chunks.drain(..) {
            let input = DmaBufferAddr { addr: chunk.addr.into() };
            if let Err(e) = mailbox.execute(Opcode::FREE_DMA, input.as_bytes()) {
                tracing::warn!(error = %e, addr = chunk.addr, "freeing a DMA chunk");
            }
        }
    }
}
