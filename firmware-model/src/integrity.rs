//! Integrity metadata of device DRAM: one 32-bit check per 64-byte line of
//! every KV frame, sealed when rows are committed and verified whenever the
//! firmware reads keys or rows, so that bytes changed behind the device's
//! back (silent corruption, a stray write) never reach a host as data.
//!
//! The check of line `n` (its DPA divided by 64) over its bytes `b`, read
//! as sixteen little-endian u32 words `w[0..16]`:
//!
//! ```text
//! check = sum(WEIGHTS[i] * w[i]) + line_salt(n)     (mod 2^32)
//! ```
//!
//! Every weight is odd, so any change confined to one word (every single-bit
//! and every burst of up to 32 bits within a word) changes the check; other
//! changes go unseen with probability about 2^-32. The salt binds a line's
//! check to its address, so a right line at a wrong place fails too. A line
//! only partly holding committed rows is checked over its committed bytes,
//! the rest read as zero: rows a writer puts beyond the committed end do not
//! disturb the check of rows already committed.
//!
//! A weighted sum and not a CRC: it runs several times faster than
//! CRC-32C's one-instruction-per-8-bytes chain with AVX2 (the scan reads
//! every key through it; docs/PERFORMANCE.md, "Integrity").

/// Bytes one check covers: a cache line, the unit of CXL poison.
pub const LINE_BYTES: u64 = 64;

/// Bytes of one line's check in the integrity table.
pub const CHECK_BYTES: u64 = 4;

/// The weight of each of a line's sixteen words (odd, so that a change in
/// one word never multiplies to zero mod 2^32).
pub const WEIGHTS: [u32; 16] = {
    let mut w = [0u32; 16];
    let mut i = 0;
    while i < 16 {
        // Odd multiples of the golden-ratio constant, well spread in bits.
        w[i] = 0x9E37_79B1u32.wrapping_mul(2 * i as u32 + 1) | 1;
        i += 1;
    }
    w
};

/// The address term of line `line`'s check.
pub const fn line_salt(line: u64) -> u32 {
    let x = line.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    (x ^ (x >> 29)) as u32
}

/// The check of line `line` holding `bytes` (at most 64; missing bytes are
/// zero): the reference the vector code is tested against.
pub fn line_check(bytes: &[u8], line: u64) -> u32 {
    assert!(bytes.len() as u64 <= LINE_BYTES, "one line is 64 bytes");
    let mut padded = [0u8; LINE_BYTES as usize];
    padded[..bytes.len()].copy_from_slice(bytes);
    padded.chunks_exact(4).zip(WEIGHTS).fold(line_salt(line), |sum, (word, weight)| {
        let word = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        sum.wrapping_add(weight.wrapping_mul(word))
    })
}

/// Lines `[first, end)` of DRAM that hold any of the bytes `[start, end)`.
pub fn lines_of(start: u64, end: u64) -> std::ops::Range<u64> {
    start / LINE_BYTES..end.div_ceil(LINE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weights_are_odd_and_distinct() {
        assert!(WEIGHTS.iter().all(|w| w % 2 == 1));
        let mut sorted = WEIGHTS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 16);
    }

    #[test]
    fn a_short_line_reads_as_zero_padded() {
        let bytes: Vec<u8> = (1..=40).collect();
        let mut padded = bytes.clone();
        padded.resize(64, 0);
        assert_eq!(line_check(&bytes, 7), line_check(&padded, 7));
        assert_eq!(line_check(&[], 7), line_salt(7));
        assert_eq!(lines_of(0, 64), 0..1);
        assert_eq!(lines_of(63, 65), 0..2);
        assert_eq!(lines_of(128, 128), 2..2);
    }

    proptest! {
        /// Every change confined to one 32-bit word is seen.
        #[test]
        fn one_word_changes_are_seen(
            line in proptest::collection::vec(any::<u8>(), 64),
            at in 0u64..1 << 40,
            word in 0usize..16,
            flip in 1u32..,
        ) {
            let good = line_check(&line, at);
            let mut bad = line.clone();
            let w = u32::from_le_bytes(bad[4 * word..4 * word + 4].try_into().unwrap()) ^ flip;
            bad[4 * word..4 * word + 4].copy_from_slice(&w.to_le_bytes());
            prop_assert_ne!(line_check(&bad, at), good);
        }
    }
}

#[cfg(test)]
mod vector_tests {
    use super::*;
    use crate::simd::{Rows, line_checks};
    use pnm_protocol::Dtype;
    use proptest::prelude::*;

    proptest! {
        /// The vector path agrees with the reference on every line, whole
        /// or partial, at any starting line.
        #[test]
        fn vector_checks_equal_the_reference(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            first in 0u64..1 << 36,
        ) {
            let mut got = Vec::new();
            line_checks(Rows::from_bytes(&bytes, Dtype::F16), first, &mut got);
            let usable = bytes.len() / 2 * 2;
            let want: Vec<u32> = bytes[..usable]
                .chunks(64)
                .enumerate()
                .map(|(i, line)| line_check(line, first + i as u64))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
