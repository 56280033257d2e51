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
//! check to its address, so a right line at a wrong place fails too.
//!
//! Checks are linear, so a scan verifies a run of lines at once: the sum of
//! their stored checks against their weighted word sum plus their salts'
//! sum ([`weighted_sum`], [`salt_sum`]). Only a run that disagrees is
//! checked line by line, to name the bad lines. Errors in several lines
//! of one run that cancel in the sum go unseen with probability 2^-32, as
//! within one line; an error confined to one word never does. A line
//! only partly holding committed rows is checked over its committed bytes,
//! the rest read as zero: rows a writer puts beyond the committed end do not
//! disturb the check of rows already committed.
//!
//! A weighted sum and not a CRC: it vectorizes (two multiplies and adds per
//! line with AVX2) where CRC-32C is one instruction per 8 bytes in a chain,
//! and it sums over runs of lines (the scan reads every key through it;
//! docs/PERFORMANCE.md, "Integrity").

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

/// Multiplier of a line number's low 32 bits in its salt (odd: lines
/// less than 2^32 apart never share a salt).
pub const SALT_LOW: u32 = 0x85EB_CA6B;
/// Multiplier of a line number's high 32 bits.
pub const SALT_HIGH: u32 = 0xC2B2_AE35;

/// The address term of line `line`'s check: linear in the line number, so
/// the salts of a run of lines sum in closed form ([`salt_sum`]).
pub const fn line_salt(line: u64) -> u32 {
    (line as u32).wrapping_mul(SALT_LOW).wrapping_add(((line >> 32) as u32).wrapping_mul(SALT_HIGH))
}

/// The sum (mod 2^32) of the salts of lines `lines`.
pub fn salt_sum(lines: std::ops::Range<u64>) -> u32 {
    if lines.is_empty() {
        return 0;
    }
    let (a, b) = (u128::from(lines.start), u128::from(lines.end));
    // Sum of the line numbers; mod 2^32 the low halves sum to the same.
    let low = ((a + b - 1) * (b - a) / 2) as u32;
    // Sum of the high halves: count the lines in each 2^32 block.
    let mut high = 0u32;
    let mut at = lines.start;
    while at < lines.end {
        let block_end = ((at >> 32) + 1).checked_shl(32).unwrap_or(u64::MAX).min(lines.end);
        let count = (block_end - at) as u32;
        high = high.wrapping_add(((at >> 32) as u32).wrapping_mul(count));
        at = block_end;
    }
    low.wrapping_mul(SALT_LOW).wrapping_add(high.wrapping_mul(SALT_HIGH))
}

/// The weighted word sum of `bytes` (whole lines, from a line start; a
/// trailing partial line zero-padded): a run of lines' checks summed,
/// less their salts. The reference for the vector code.
pub fn weighted_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(LINE_BYTES as usize)
        .fold(0u32, |sum, line| sum.wrapping_add(line_check(line, 0).wrapping_sub(line_salt(0))))
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
    fn salts_sum_in_closed_form_across_blocks() {
        for range in
            [0..0, 0..1, 5..1029, (1 << 32) - 3..(1 << 32) + 5, (7 << 40) + 9..(7 << 40) + 700]
        {
            let want = range.clone().fold(0u32, |s, n| s.wrapping_add(line_salt(n)));
            assert_eq!(salt_sum(range.clone()), want, "{range:?}");
        }
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
    use crate::simd::{Rows, line_checks, line_sums};
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
            prop_assert_eq!(&got, &want);
            // And the run's sum is the sum of its checks.
            let mut sum = 0u32;
            line_sums(Rows::from_bytes(&bytes, Dtype::F16), &mut sum);
            let lines = first..first + want.len() as u64;
            let total = want.iter().fold(0u32, |s, c| s.wrapping_add(*c));
            prop_assert_eq!(sum.wrapping_add(salt_sum(lines)), total);
            prop_assert_eq!(sum, weighted_sum(&bytes[..usable]));
        }
    }
}
