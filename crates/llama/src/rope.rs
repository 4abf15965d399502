//! Rotary position embeddings: each pair of a head's dimensions turned by position × its
//! frequency, the pairs either adjacent (GGUF llama) or a half-head apart (NEOX: GGUF qwen2,
//! qwen3, gemma3).

/// Frequencies of the `head_dim / 2` pairs, as llama.cpp's `ggml_rope_ext` computes them:
/// `base^(-2j/head_dim)`, divided by the linear `scale` and by Llama 3's per-pair `factors`
/// (`rope_freqs.weight`) where given.
pub(crate) fn frequencies(
    head_dim: usize,
    base: f32,
    scale: f32,
    factors: Option<Vec<f32>>,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| {
            let f = 1.0 / base.powf((2 * j) as f32 / head_dim as f32) / scale;
            factors.as_ref().map_or(f, |ff| f / ff[j])
        })
        .collect()
}

/// Rotation angles of a step's rows (of one sequence or of several), shared by every layer with
/// the same frequencies.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
    halves: bool,
}

impl Rope {
    /// Angles for rows at `positions`, one position per row.
    pub fn new(freqs: &[f32], positions: &[usize], halves: bool) -> Self {
        let angles: Vec<f32> =
            positions.iter().flat_map(|&p| freqs.iter().map(move |f| p as f32 * f)).collect();
        Rope {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            pairs: freqs.len(),
            halves,
        }
    }

    /// Rotates every head of every row (as many rows as positions).
    pub fn apply(&self, rows: &mut [f32], head_dim: usize) {
        let len = self.cos.len() / self.pairs;
        for (i, row) in rows.chunks_exact_mut(rows.len() / len).enumerate() {
            let (cos, sin) = (&self.cos[i * self.pairs..], &self.sin[i * self.pairs..]);
            for head in row.chunks_exact_mut(head_dim) {
                match self.halves {
                    true => {
                        let (a, b) = head.split_at_mut(head_dim / 2);
                        for j in 0..self.pairs {
                            (a[j], b[j]) = turn(a[j], b[j], cos[j], sin[j]);
                        }
                    }
                    false => {
                        for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                            (pair[0], pair[1]) = turn(pair[0], pair[1], cos[j], sin[j]);
                        }
                    }
                }
            }
        }
    }
}

fn turn(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a * cos - b * sin, a * sin + b * cos)
}
