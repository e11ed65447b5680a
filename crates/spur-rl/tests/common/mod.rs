//! A tiny causal language model for the trainer's tests: every position sees the running mean of
//! the embeddings before it, so completions depend on their prompt and prefix.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var, D};
use spur_rl::{PackedSequences, Policy, Rng};

pub struct ToyLm {
    pub embed: Var,
    pub mix: Var,
    pub out: Var,
    pub bias: Var,
    pub vocab: usize,
}

fn init(rng: &mut Rng, shape: (usize, usize), scale: f64, dtype: DType) -> Var {
    let n = shape.0 * shape.1;
    let data: Vec<f64> = (0..n)
        .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale)
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

impl ToyLm {
    pub fn new(vocab: usize, dim: usize, seed: u64, dtype: DType) -> Self {
        let mut rng = Rng::new(seed);
        Self {
            embed: init(&mut rng, (vocab, dim), 1.0, dtype),
            mix: init(&mut rng, (dim, dim), 0.5, dtype),
            out: init(&mut rng, (vocab, dim), 0.5, dtype),
            bias: init(&mut rng, (1, vocab), 0.1, dtype),
            vocab,
        }
    }

    /// All weights, flattened in `named_vars` order (for bitwise comparisons).
    pub fn snapshot(&self) -> Vec<Vec<f32>> {
        self.named_vars()
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    /// Next-token probabilities after `prefix` (f64, for sampling and measuring in tests).
    pub fn next_probs(&self, prefix: &[u32]) -> Vec<f64> {
        let last_position = prefix.len() - 1..prefix.len();
        let batch = PackedSequences::new(&[prefix], &[last_position], &Device::Cpu).unwrap();
        let last = self.forward_logits(&batch).unwrap().get(0).unwrap();
        let p = candle_nn::ops::softmax(&last.to_dtype(DType::F64).unwrap(), D::Minus1).unwrap();
        p.to_vec1::<f64>().unwrap()
    }

    /// Samples `len` tokens after `prompt` at temperature 1.
    pub fn sample(&self, prompt: &[u32], len: usize, rng: &mut Rng) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        for _ in 0..len {
            let probs = self.next_probs(&seq);
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let mut acc = 0.0;
            let mut pick = probs.len() as u32 - 1;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if u < acc {
                    pick = i as u32;
                    break;
                }
            }
            seq.push(pick);
        }
        seq[prompt.len()..].to_vec()
    }
}

impl Policy for ToyLm {
    fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("bias".into(), self.bias.clone()),
            ("embed".into(), self.embed.clone()),
            ("mix".into(), self.mix.clone()),
            ("out".into(), self.out.clone()),
        ]
    }

    fn forward_logits(&self, batch: &PackedSequences) -> spur_rl::Result<Tensor> {
        let ids = batch.tokens();
        let len = ids.dim(1)?;
        let dtype = self.embed.dtype();
        let x = self
            .embed
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?;
        // Causal running mean within each sequence: row j averages its sequence's positions up
        // to j.
        let mut avg = vec![0f64; len * len];
        let mut start = 0;
        for &n in batch.lengths() {
            for j in 0..n {
                for i in 0..=j {
                    avg[(start + j) * len + start + i] = 1.0 / (j + 1) as f64;
                }
            }
            start += n;
        }
        let avg = Tensor::from_vec(avg, (len, len), &Device::Cpu)?.to_dtype(dtype)?;
        let context = avg.matmul(&x)?;
        let h = (x + context.matmul(self.mix.as_tensor())?)?.tanh()?;
        let h = h.index_select(batch.logit_rows(), 0)?;
        let logits = h
            .matmul(&self.out.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?;
        Ok(logits)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }
}
