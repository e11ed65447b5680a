//! Products of a few activation rows with GGUF Q4_1 / Q8_0 weights, for decoding at small
//! batch on the CPU.
//!
//! candle 0.10.2 has no SIMD kernel for Q4_1 (the default model's layout) and re-reads the
//! weights once per activation row. Here each activation row is quantised to 8 bits per
//! 32-value block (as llama.cpp does), the weights stay in the GGUF's own bytes, and each
//! weight row is dotted with every activation row while it is in cache. The block dot products
//! use AVX2 integer multiply-adds when the build targets AVX2 (spur's `.cargo/config.toml`
//! does), else a portable loop computing the same sums.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block (Q4_1, Q8_0 and the activations alike).
const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Per block: f16 scale d, f16 minimum m, 16 bytes of nibbles; value = d·q + m. Byte j holds
    /// value j in its low nibble and value j + 16 in its high nibble.
    Q4_1,
    /// Per block: f16 scale d, 32 signed bytes; value = d·q.
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// A quantised weight matrix `[rows, cols]` (`y = x Wᵀ`) in its GGUF byte layout.
#[derive(Debug)]
pub(crate) struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

/// One activation row quantised to 8 bits per block: `x ≈ scale·q`; `sum` = scale·Σq (Q4_1
/// weights need it for their minimum term).
struct QuantRow {
    scales: Vec<f32>,
    sums: Vec<f32>,
    values: Vec<i8>,
}

impl QuantMatrix {
    /// The matrix of a 2-D Q4_1 or Q8_0 tensor whose row length is a whole number of blocks;
    /// `None` for anything else (the caller keeps candle's kernel for those).
    pub(crate) fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let format = match tensor.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        let &[rows, cols] = tensor.shape().dims() else {
            return Ok(None);
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let bytes = tensor.data()?.into_owned();
        if bytes.len() != rows * cols / BLOCK * format.block_bytes() {
            candle_core::bail!(
                "{:?} tensor [{rows}, {cols}] holds {} bytes",
                format,
                bytes.len()
            );
        }
        Ok(Some(QuantMatrix {
            format,
            rows,
            cols,
            bytes,
        }))
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// `x`: `m` rows of `cols` values. Returns `m` rows of `rows` values, `x Wᵀ`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        let inputs: Vec<QuantRow> = x.chunks_exact(self.cols).map(quantize_row).collect();
        let row_bytes = self.cols / BLOCK * self.format.block_bytes();
        // Output transposed ([rows, m]) so that each task writes one contiguous span.
        let mut out_t = vec![0f32; self.rows * m];
        const ROWS_PER_TASK: usize = 32;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .zip(self.bytes.par_chunks(ROWS_PER_TASK * row_bytes))
            .for_each(|(out, weights)| {
                for (out_row, w) in out.chunks_exact_mut(m).zip(weights.chunks_exact(row_bytes)) {
                    for (o, input) in out_row.iter_mut().zip(&inputs) {
                        *o = match self.format {
                            Format::Q4_1 => dot_q4_1(w, input),
                            Format::Q8_0 => dot_q8_0(w, input),
                        };
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for (r, values) in out_t.chunks_exact(m).enumerate() {
            for (i, v) in values.iter().enumerate() {
                out[i * self.rows + r] = *v;
            }
        }
        out
    }
}

fn quantize_row(x: &[f32]) -> QuantRow {
    let blocks = x.len() / BLOCK;
    let mut row = QuantRow {
        scales: Vec::with_capacity(blocks),
        sums: Vec::with_capacity(blocks),
        values: vec![0; x.len()],
    };
    for (block, q) in x
        .chunks_exact(BLOCK)
        .zip(row.values.chunks_exact_mut(BLOCK))
    {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
        }
        row.scales.push(scale);
        row.sums.push(scale * sum as f32);
    }
    row
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// One weight row (Q4_1 blocks) dotted with one quantised activation row.
fn dot_q4_1(weights: &[u8], x: &QuantRow) -> f32 {
    let mut acc = Accumulator::new();
    let mut minimum_terms = 0f32;
    let blocks = weights.chunks_exact(20).zip(x.values.chunks_exact(BLOCK));
    for (i, (block, q)) in blocks.enumerate() {
        minimum_terms += half_at(block, 2) * x.sums[i];
        acc.add(
            half_at(block, 0) * x.scales[i],
            nibble_products(&block[4..20], q),
        );
    }
    acc.sum() + minimum_terms
}

/// One weight row (Q8_0 blocks) dotted with one quantised activation row.
fn dot_q8_0(weights: &[u8], x: &QuantRow) -> f32 {
    let mut acc = Accumulator::new();
    let blocks = weights.chunks_exact(34).zip(x.values.chunks_exact(BLOCK));
    for (i, (block, q)) in blocks.enumerate() {
        acc.add(
            half_at(block, 0) * x.scales[i],
            byte_products(&block[2..34], q),
        );
    }
    acc.sum()
}

/// Integer products of one block, eight partial sums wide (the SIMD lanes).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
type Products = std::arch::x86_64::__m256i;
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
type Products = i32;

/// Σ scale·products over blocks, kept in SIMD lanes until the end.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
struct Accumulator(std::arch::x86_64::__m256);

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
impl Accumulator {
    fn new() -> Self {
        // SAFETY: AVX2 is enabled at compile time (cfg above), as for every intrinsic below.
        Accumulator(unsafe { std::arch::x86_64::_mm256_setzero_ps() })
    }

    #[inline]
    fn add(&mut self, scale: f32, products: Products) {
        use std::arch::x86_64::*;
        // SAFETY: see `new`.
        unsafe {
            let p = _mm256_cvtepi32_ps(products);
            self.0 = _mm256_fmadd_ps(_mm256_set1_ps(scale), p, self.0);
        }
    }

    fn sum(self) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: see `new`.
        unsafe {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps(self.0, 1),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
struct Accumulator(f32);

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
impl Accumulator {
    fn new() -> Self {
        Accumulator(0.0)
    }

    fn add(&mut self, scale: f32, products: Products) {
        self.0 += scale * products as f32;
    }

    fn sum(self) -> f32 {
        self.0
    }
}

/// w_j·q_j over one block, w_j the unsigned nibbles of 16 bytes (low nibbles first).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
fn nibble_products(nibbles: &[u8], q: &[i8]) -> Products {
    use std::arch::x86_64::*;
    assert!(nibbles.len() == 16 && q.len() == BLOCK);
    // SAFETY: AVX2 is enabled at compile time; the loads read exactly 16 and 32 bytes from
    // slices of those lengths (checked above).
    unsafe {
        let packed = _mm_loadu_si128(nibbles.as_ptr() as *const __m128i);
        let low_mask = _mm_set1_epi8(0x0f);
        let low = _mm_and_si128(packed, low_mask);
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        let w = _mm256_set_m128i(high, low);
        let a = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn nibble_products(nibbles: &[u8], q: &[i8]) -> Products {
    nibbles
        .iter()
        .enumerate()
        .map(|(j, b)| (b & 0x0f) as i32 * q[j] as i32 + (b >> 4) as i32 * q[j + 16] as i32)
        .sum()
}

/// w_j·q_j over one block of signed bytes.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
fn byte_products(w: &[u8], q: &[i8]) -> Products {
    use std::arch::x86_64::*;
    assert!(w.len() == BLOCK && q.len() == BLOCK);
    // SAFETY: as in `nibble_products`; both slices hold 32 bytes.
    unsafe {
        let w = _mm256_loadu_si256(w.as_ptr() as *const __m256i);
        let a = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
        // maddubs needs an unsigned operand: |w| times a with w's sign moved onto a.
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
        _mm256_madd_epi16(products, _mm256_set1_epi16(1))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn byte_products(w: &[u8], q: &[i8]) -> Products {
    w.iter()
        .zip(q)
        .map(|(&w, &q)| w as i8 as i32 * q as i32)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Weights quantised by candle, products against candle's dequantised f32 weights: equal
    /// up to the 8-bit rounding of the activations.
    fn check(dtype: GgmlDType) {
        let device = Device::Cpu;
        let (rows, cols, m) = (70, 96, 3);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &device).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, cols), &device).unwrap();
        let got = matrix.matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), m);
        let want = x
            .matmul(&q.dequantize(&device).unwrap().t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            // |x|·|w| ≈ cols over a block-quantised x with relative error ≤ 1/254 per value.
            assert!((g - w).abs() < 0.05 * (cols as f32).sqrt(), "{g} vs {w}");
        }
        assert_eq!(matrix.rows(), rows);
    }

    #[test]
    fn q4_1_products_match_dequantised_weights() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_products_match_dequantised_weights() {
        check(GgmlDType::Q8_0);
    }

    #[test]
    fn block_products_are_exact() {
        let nibbles: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(37)).collect();
        let q: Vec<i8> = (0..32i32)
            .map(|i| (i * 11 - 170).clamp(-127, 127) as i8)
            .collect();
        let want_nibbles: i32 = (0..16)
            .map(|j| {
                (nibbles[j] & 0x0f) as i32 * q[j] as i32
                    + (nibbles[j] >> 4) as i32 * q[j + 16] as i32
            })
            .sum();
        let sum = |p: Products| {
            let mut acc = Accumulator::new();
            acc.add(1.0, p);
            acc.sum() as i32
        };
        assert_eq!(sum(nibble_products(&nibbles, &q)), want_nibbles);
        let w: Vec<u8> = (0..32i32).map(|i| (i * 9 - 128) as i8 as u8).collect();
        let want_bytes: i32 = w
            .iter()
            .zip(&q)
            .map(|(&w, &q)| w as i8 as i32 * q as i32)
            .sum();
        assert_eq!(sum(byte_products(&w, &q)), want_bytes);
    }
}
