//! Host DMA buffers: chunks of the host DMA window obtained from the device
//! (Allocate DMA), carved into buffers by a first-fit allocator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use pnm_protocol::commands::{AllocateDmaInput, DMA_GRANULE, DmaBufferAddr};
use pnm_protocol::{Opcode, RegionLayout, ReturnCode};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};
use crate::mailbox::MailboxClient;

/// Bytes asked of the device at a time (larger requests get their own chunk).
pub const CHUNK: u64 = 4 << 20;
/// Buffers are aligned to a cache line.
const ALIGN: u64 = 64;

/// A buffer in the host DMA window: region offset and length. It goes
/// back to its pool when dropped, on every path, error paths included.
#[derive(Debug)]
pub struct DmaBuf {
    pub addr: u64,
    pub len: u64,
    pool: Weak<Mutex<Chunks>>,
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // A pool already released gave its chunks back to the device whole.
        if let Some(chunks) = self.pool.upgrade() {
            chunks.lock().unwrap_or_else(|e| e.into_inner()).free(self.addr, self.len);
        }
    }
}

#[derive(Debug)]
struct Chunk {
    addr: u64,
    len: u64,
    /// Free ranges: offset from the chunk start -> length.
    free: BTreeMap<u64, u64>,
}

/// The chunks a pool holds, shared with its buffers (which free
/// themselves into it).
#[derive(Debug, Default)]
struct Chunks(Vec<Chunk>);

/// The driver's DMA buffers.
#[derive(Debug)]
pub struct DmaPool {
    window: (u64, u64),
    chunks: Arc<Mutex<Chunks>>,
}

impl DmaPool {
    pub fn new(layout: &RegionLayout) -> Self {
        Self { window: (layout.dma_window_offset, layout.dma_window_size), chunks: Arc::default() }
    }

    fn chunks(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn buffer(&self, (addr, len): (u64, u64)) -> DmaBuf {
        DmaBuf { addr, len, pool: Arc::downgrade(&self.chunks) }
    }

    /// A buffer of at least `len` bytes.
    pub fn alloc(&mut self, mailbox: &mut MailboxClient, len: u64) -> Result<DmaBuf> {
        let len = len.max(1).next_multiple_of(ALIGN);
        if let Some(range) = self.chunks().carve(len) {
            return Ok(self.buffer(range));
        }
        // A whole chunk if the window has room, else just what is needed.
        let exact = len.next_multiple_of(DMA_GRANULE);
        let mut size = len.max(CHUNK).next_multiple_of(DMA_GRANULE);
        let out = loop {
            let owner = mailbox.owner();
            let input = AllocateDmaInput {
                size: size.into(),
                owner_pid: owner.word().into(),
                peer_id: owner.peer().into(),
                reserved: [0; 2],
            };
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
        let mut chunks = self.chunks();
        chunks.0.push(Chunk { addr, len: size, free: BTreeMap::from([(0, size)]) });
        let range = chunks.carve(len).expect("a fresh chunk fits the request");
        drop(chunks);
        Ok(self.buffer(range))
    }

    /// Gives every chunk back to the device. Buffers still alive then free
    /// into nothing.
    pub fn release(&mut self, mailbox: &mut MailboxClient) {
        let chunks = std::mem::take(&mut self.chunks().0);
        for chunk in chunks {
            let input = DmaBufferAddr { addr: chunk.addr.into() };
            if let Err(e) = mailbox.execute(Opcode::FREE_DMA, input.as_bytes()) {
                tracing::warn!(error = %e, addr = chunk.addr, "freeing a DMA chunk");
            }
        }
    }
}

impl Chunks {
    /// A free range of `len` bytes: (address, length).
    fn carve(&mut self, len: u64) -> Option<(u64, u64)> {
        for chunk in &mut self.0 {
            let found = chunk.free.iter().find(|&(_, &free)| free >= len).map(|(&o, &l)| (o, l));
            if let Some((offset, free)) = found {
                chunk.free.remove(&offset);
                if free > len {
                    chunk.free.insert(offset + len, free - len);
                }
                return Some((chunk.addr + offset, len));
            }
        }
        None
    }

    /// Returns a range to its chunk, merging it with free neighbours.
    fn free(&mut self, addr: u64, len: u64) {
        let Some(chunk) = self.0.iter_mut().find(|c| addr >= c.addr && addr < c.addr + c.len)
        else {
            return; // its chunk was released
        };
        let mut offset = addr - chunk.addr;
        let mut len = len;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool holding one 64 KiB chunk at 1 MiB, as if the device had
    /// granted it.
    fn pool() -> DmaPool {
        let layout = RegionLayout::new(8 << 20, None).expect("a valid layout");
        let pool = DmaPool::new(&layout);
        let chunk = Chunk { addr: 1 << 20, len: 64 << 10, free: BTreeMap::from([(0, 64 << 10)]) };
        pool.chunks().0.push(chunk);
        pool
    }

    fn take(pool: &DmaPool, len: u64) -> DmaBuf {
        let range = pool.chunks().carve(len).expect("room in the chunk");
        pool.buffer(range)
    }

    #[test]
    fn buffers_free_themselves_and_neighbours_merge() {
        let pool = pool();
        let a = take(&pool, 4096);
        let b = take(&pool, 4096);
        assert_eq!(b.addr, a.addr + 4096);
        let a_addr = a.addr;
        drop(a);
        let c = take(&pool, 4096);
        assert_eq!(c.addr, a_addr, "a dropped buffer is reused");
        drop((b, c));
        let chunks = pool.chunks();
        assert_eq!(chunks.0[0].free, BTreeMap::from([(0, 64 << 10)]), "merged back whole");
    }

    #[test]
    fn a_buffer_that_outlives_its_pool_frees_into_nothing() {
        let pool = pool();
        let a = take(&pool, 4096);
        drop(pool);
        drop(a);
    }
}
