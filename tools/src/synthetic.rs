//! A synthetic KV cache with the structure real decoder caches show.
//!
//! Per (layer, KV head) two orthonormal directions are drawn: a "topic" `u`
//! that every query leans on, and a "recency" `r`. Keys are N(0, 1) noise per
//! element plus:
//! - **attention sinks**: the first 4 tokens carry `45 u`, so nearly every
//!   query gives them the largest logits (as with the BOS token);
//! - **heavy hitters**: 0.5% of tokens, drawn at random, carry `30 u`;
//! - **recent-token locality**: token t carries `34 exp(-(T - 1 - t) / 64) r`,
//!   so the last few hundred tokens matter more the newer they are.
//!
//! Queries are `3 u + 2 r + N(0, 0.1^2)` per element, one per query head of a
//! GQA group. With head_dim 128 the scaled logits `q.k / sqrt(d)` are near 12
//! for sinks, 8 for heavy hitters, up to 6 for the newest tokens and
//! N(0, 0.3^2) for the rest: a peaked distribution in which a few percent of
//! the tokens carry most of the attention mass, as measured on real models
//! (StreamingLLM's sinks, H2O's heavy hitters). Values are N(0, 1).

/// xorshift64* with Box-Muller normals: fast and reproducible.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, spare: None }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (a, b) = (self.uniform(), self.uniform());
        let radius = (-2.0 * a.ln()).sqrt();
        let angle = std::f32::consts::TAU * b;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub const SINKS: usize = 4;
pub const HEAVY_HITTER_FRACTION: f64 = 0.005;
pub const RECENCY_SCALE: f32 = 64.0;

/// The hidden structure of one (layer, head) stream.
#[derive(Debug, Clone)]
pub struct Stream {
    pub topic: Vec<f32>,
    pub recency: Vec<f32>,
}

fn unit(rng: &mut Rng, d: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

impl Stream {
    pub fn new(rng: &mut Rng, d: usize) -> Self {
        let topic = unit(rng, d);
        let mut recency = unit(rng, d);
        // Gram-Schmidt: make r orthogonal to u.
        let dot: f32 = topic.iter().zip(&recency).map(|(a, b)| a * b).sum();
        recency.iter_mut().zip(&topic).for_each(|(r, u)| *r -= dot * u);
        let norm = recency.iter().map(|x| x * x).sum::<f32>().sqrt();
        recency.iter_mut().for_each(|r| *r /= norm);
        Self { topic, recency }
    }

    /// Key of token `t` of a context whose newest token is `last`.
    pub fn key(&self, rng: &mut Rng, t: usize, last: usize, heavy: bool, out: &mut [f32]) {
        let mut topic = if t < SINKS { 45.0 } else { 0.0 };
        if heavy {
            topic += 30.0;
        }
        let recent = 34.0 * (-((last - t) as f32) / RECENCY_SCALE).exp();
        for (i, o) in out.iter_mut().enumerate() {
            *o = rng.normal() + topic * self.topic[i] + recent * self.recency[i];
        }
    }

    /// A stream of `t` tokens with this structure: `emit` gets each
    /// token's key and value row (`d` elements) in order; its heavy
    /// hitters are drawn here.
    pub fn generate(
        rng: &mut Rng,
        t: usize,
        d: usize,
        mut emit: impl FnMut(&[f32], &[f32]),
    ) -> Self {
        let structure = Self::new(rng, d);
        let heavy: std::collections::HashSet<u64> =
            (0..(t as f64 * HEAVY_HITTER_FRACTION) as usize).map(|_| rng.below(t as u64)).collect();
        let (mut key, mut value) = (vec![0f32; d], vec![0f32; d]);
        for i in 0..t {
            structure.key(rng, i, t - 1, heavy.contains(&(i as u64)), &mut key);
            value.iter_mut().for_each(|v| *v = rng.normal());
            emit(&key, &value);
        }
        structure
    }

    /// One query of the stream's GQA group.
    pub fn query(&self, rng: &mut Rng, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = 3.0 * self.topic[i] + 2.0 * self.recency[i] + 0.1 * rng.normal();
        }
    }
}
