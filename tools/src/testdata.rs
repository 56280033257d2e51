//! Deterministic data for drills, benchmarks and tests: the same seed gives
//! the same values on every machine, so a reader of a report can rebuild
//! the rows and queries it was checked with.

/// `n` values in [-1, 1) from xorshift64 seeded with `seed` (0 is taken as 1).
pub fn random_f32s(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.max(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_are_in_range_and_repeat_by_seed() {
        let a = super::random_f32s(7, 1000);
        assert_eq!(a, super::random_f32s(7, 1000));
        assert_ne!(a, super::random_f32s(8, 1000));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
