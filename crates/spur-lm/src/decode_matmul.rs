//! `x Wᵀ` for the few activation rows of a decode step, on the CPU, with f32 weights.
//!
//! A general GEMM (candle's `gemm`) first packs a panel of W into a scratch layout, then runs
//! its micro-kernel; with 1–64 activation rows the packing is a second pass over the weights
//! and the micro-kernel's tiles are mostly empty. Here each output is a dot product of an
//! activation row with a weight row as stored (`W` is `[n, k]` row-major): a tile of
//! [`TILE_M`] activation rows × [`TILE_N`] weight rows keeps its 12 partial sums in AVX2
//! registers, so each weight row is read from memory once per call and reused from cache for
//! every group of activation rows. Each output's sum runs over k in the same order whatever the
//! number of rows, so a sequence's logits do not depend on the batch it is decoded in.
//! No backward pass: decoding takes no gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

/// Activation rows per register tile.
const TILE_M: usize = 4;
/// Weight rows per register tile.
const TILE_N: usize = 3;
/// Weight rows per parallel task (a multiple of [`TILE_N`]).
const TASK_N: usize = 16 * TILE_N;

/// `x Wᵀ` for x `[m, k]` and W `[n, k]`, both contiguous f32: `[m, n]`.
pub(crate) struct DecodeMatmul;

fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("decode-matmul: {what} must be f32");
    };
    let (rows, cols) = layout.shape().dims2()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("decode-matmul: {what} must be contiguous");
    };
    Ok((&data[start..end], rows, cols))
}

impl CustomOp2 for DecodeMatmul {
    fn name(&self) -> &'static str {
        "decode-matmul"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m, k) = contiguous(x_storage, x_layout, "x")?;
        let (w, n, wk) = contiguous(w_storage, w_layout, "W")?;
        if wk != k {
            candle_core::bail!("decode-matmul: x [{m}, {k}] against W [{n}, {wk}]");
        }
        Ok((
            CpuStorage::F32(matmul_t(x, m, w, n, k)),
            Shape::from((m, n)),
        ))
    }
}

/// Row-major `[m, n]` output shared by tasks that write disjoint column ranges.
struct Output {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: tasks write through `Output::set` only at columns of their own weight rows, which
// no other task writes (see `matmul_t`), and the buffer outlives the parallel loop.
unsafe impl Sync for Output {}

impl Output {
    /// SAFETY: `row < m`, `col < n`, and no other thread writes (row, col).
    unsafe fn set(&self, row: usize, col: usize, value: f32) {
        *self.ptr.add(row * self.n + col) = value;
    }
}

fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let output = Output {
        ptr: out.as_mut_ptr(),
        n,
    };
    let output = &output;
    if k == 0 {
        return out;
    }
    let x_rows: Vec<&[f32]> = x.chunks_exact(k).collect();
    w.par_chunks(TASK_N * k)
        .enumerate()
        .for_each(|(task, weights)| {
            let w_rows: Vec<&[f32]> = weights.chunks_exact(k).collect();
            let w_tiles: Vec<&[&[f32]]> = w_rows.chunks(TILE_N).collect();
            for (tile_n, &w_tile) in w_tiles.iter().enumerate() {
                let col = task * TASK_N + tile_n * TILE_N;
                let next = w_tiles.get(tile_n + 1).copied().unwrap_or(w_tile);
                for (tile_m, x_tile) in x_rows.chunks(TILE_M).enumerate() {
                    let row = tile_m * TILE_M;
                    let sums = tile(x_tile, w_tile, next);
                    for (i, sums) in sums.iter().enumerate().take(x_tile.len()) {
                        for (j, &sum) in sums.iter().enumerate().take(w_tile.len()) {
                            // SAFETY: row + i < m and col + j < n by the chunking above, and
                            // column col + j belongs to this task's weight rows alone.
                            unsafe { output.set(row + i, col + j, sum) };
                        }
                    }
                }
            }
        });
    out
}

/// Dot products of up to [`TILE_M`] activation rows with up to [`TILE_N`] weight rows.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn tile(x: &[&[f32]], w: &[&[f32]], next: &[&[f32]]) -> [[f32; TILE_N]; TILE_M] {
    // Fixed tile shapes, so that the accumulators are registers.
    match (x.len(), w.len()) {
        (4, 3) => simd::tile::<4, 3>(x, w, next),
        (4, 2) => simd::tile::<4, 2>(x, w, next),
        (4, 1) => simd::tile::<4, 1>(x, w, next),
        (3, 3) => simd::tile::<3, 3>(x, w, next),
        (3, 2) => simd::tile::<3, 2>(x, w, next),
        (3, 1) => simd::tile::<3, 1>(x, w, next),
        (2, 3) => simd::tile::<2, 3>(x, w, next),
        (2, 2) => simd::tile::<2, 2>(x, w, next),
        (2, 1) => simd::tile::<2, 1>(x, w, next),
        (1, 3) => simd::tile::<1, 3>(x, w, next),
        (1, 2) => simd::tile::<1, 2>(x, w, next),
        (1, 1) => simd::tile::<1, 1>(x, w, next),
        (rows, cols) => unreachable!("a {rows}x{cols} tile"),
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn tile(x: &[&[f32]], w: &[&[f32]], _next: &[&[f32]]) -> [[f32; TILE_N]; TILE_M] {
    let mut sums = [[0f32; TILE_N]; TILE_M];
    for (i, x) in x.iter().enumerate() {
        for (j, w) in w.iter().enumerate() {
            sums[i][j] = x.iter().zip(w.iter()).map(|(a, b)| a * b).sum();
        }
    }
    sums
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use std::arch::x86_64::*;

    use super::{TILE_M, TILE_N};

    const LANES: usize = 8;

    #[inline(always)]
    pub(super) fn tile<const M: usize, const N: usize>(
        x: &[&[f32]],
        w: &[&[f32]],
        next: &[&[f32]],
    ) -> [[f32; TILE_N]; TILE_M] {
        let k = x[0].len();
        assert!(x.len() == M && w.len() == N);
        assert!(x.iter().chain(w).chain(next).all(|row| row.len() == k));
        let body = k - k % LANES;
        let mut sums = [[0f32; TILE_N]; TILE_M];
        // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every load reads
        // LANES values at offset `at` < body ≤ k from a row of length k (asserted above).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); N]; M];
            let mut at = 0;
            while at < body {
                // The next weight rows, while this tile computes: the first pass over a
                // tile otherwise waits on memory.
                if at % 16 == 0 {
                    for row in next {
                        _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(at) as *const i8);
                    }
                }
                let mut wv = [_mm256_setzero_ps(); N];
                for j in 0..N {
                    wv[j] = _mm256_loadu_ps(w[j].as_ptr().add(at));
                }
                for i in 0..M {
                    let xv = _mm256_loadu_ps(x[i].as_ptr().add(at));
                    for j in 0..N {
                        acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
                at += LANES;
            }
            for i in 0..M {
                for j in 0..N {
                    let tail: f32 = (body..k).map(|c| x[i][c] * w[j][c]).sum();
                    sums[i][j] = horizontal_sum(acc[i][j]) + tail;
                }
            }
        }
        sums
    }

    #[inline(always)]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Against candle's matmul, for shapes with partial tiles, a partial task and a k that is
    /// not a multiple of the SIMD width; and row results independent of the number of rows.
    #[test]
    fn matches_candle_and_does_not_depend_on_the_rows() {
        let device = Device::Cpu;
        for (m, n, k) in [
            (1, 1, 1),
            (5, 7, 13),
            (16, 100, 64),
            (64, 49, 96),
            (3, 50, 200),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = x.apply_op2_no_bwd(&w, &DecodeMatmul).unwrap();
            let diff = (want - &got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-4 * k as f32,
                "[{m}x{k}]·[{n}x{k}]ᵀ differs by {diff}"
            );
            let last = x.narrow(0, m - 1, 1).unwrap();
            let alone = last.apply_op2_no_bwd(&w, &DecodeMatmul).unwrap();
            let in_batch = got.narrow(0, m - 1, 1).unwrap();
            assert_eq!(
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                in_batch.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
