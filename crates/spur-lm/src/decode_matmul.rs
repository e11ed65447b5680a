//! `x Wᵀ` for the few activation rows of a decode step, on the CPU, with f32 weights.
//!
//! A general GEMM (candle's `gemm`) first packs a panel of W into a scratch layout, then runs
//! its micro-kernel; with 1–64 activation rows the packing is a second pass over the weights
//! and the micro-kernel's tiles are mostly empty. Here each output is a dot product of an
//! activation row with a weight row as stored (`W` is `[n, k]` row-major): a tile of
//! [`TILE_M`] activation rows × N weight rows keeps its partial sums in registers, so each
//! weight row is read from memory once per call and reused from cache for every group of
//! activation rows. N is 3 with AVX2's 16 vector registers and 6 where AVX-512VL gives 32 (the
//! same 8-lane AVX2 arithmetic, so the bits do not change, only fewer loads per multiply-add).
//! Each output's sum runs over k in the same order whatever the number of rows or the tile
//! width, so a sequence's logits do not depend on the batch it is decoded in.
//! No backward pass: decoding takes no gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

use crate::contiguous_f32;

/// Activation rows per register tile.
const TILE_M: usize = 4;
/// Weight rows per parallel task: a multiple of every tile width.
const TASK_N: usize = 48;

/// `x Wᵀ` for x `[m, k]` and W `[n, k]`, both contiguous f32: `[m, n]`.
pub(crate) struct DecodeMatmul;

/// A rank-2 operand: its values, rows and columns.
fn matrix<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (rows, cols) = layout.shape().dims2()?;
    let data = contiguous_f32(storage, layout, "decode-matmul", what)?;
    Ok((data, rows, cols))
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
        let (x, m, k) = matrix(x_storage, x_layout, "x")?;
        let (w, n, wk) = matrix(w_storage, w_layout, "W")?;
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
// no other task writes (see `matmul_with`), and the buffer outlives the parallel loop.
unsafe impl Sync for Output {}

impl Output {
    /// SAFETY: `row < m`, `col < n`, and no other thread writes (row, col).
    unsafe fn set(&self, row: usize, col: usize, value: f32) {
        *self.ptr.add(row * self.n + col) = value;
    }
}

/// The next tile's weight rows, fetched into cache while a tile computes. A tile is computed
/// in `passes` passes (one per group of activation rows); pass `pass` fetches one cache line
/// in every `passes`, so the memory requests spread over all of the tile's arithmetic instead
/// of queueing up in the first pass.
#[derive(Clone, Copy)]
// The portable kernel leaves prefetching to the hardware.
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )),
    allow(dead_code)
)]
struct Prefetch<'a> {
    rows: &'a [&'a [f32]],
    pass: usize,
    passes: usize,
}

/// Dot products of 1–[`TILE_M`] activation rows with N weight rows.
type Tile<const N: usize> = fn(&[&[f32]], &[&[f32]; N], Prefetch) -> [[f32; N]; TILE_M];

fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return matmul_with::<6>(x, m, w, n, k, simd::tile_avx512);
        }
        matmul_with::<3>(x, m, w, n, k, simd::tile_avx2)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    matmul_with::<3>(x, m, w, n, k, portable_tile)
}

fn matmul_with<const N: usize>(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    tile: Tile<N>,
) -> Vec<f32> {
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
    let passes = m.div_ceil(TILE_M);
    w.par_chunks(TASK_N * k)
        .enumerate()
        .for_each(|(task, weights)| {
            let w_rows: Vec<&[f32]> = weights.chunks_exact(k).collect();
            // The last tile of a matrix whose rows are not a multiple of N repeats its last
            // row; those outputs are dropped.
            let w_tiles: Vec<[&[f32]; N]> = w_rows
                .chunks(N)
                .map(|rows| std::array::from_fn(|j| rows[j.min(rows.len() - 1)]))
                .collect();
            for (tile_n, w_tile) in w_tiles.iter().enumerate() {
                let col = task * TASK_N + tile_n * N;
                let cols = N.min(n - col);
                let next = w_tiles.get(tile_n + 1).unwrap_or(w_tile);
                for (tile_m, x_tile) in x_rows.chunks(TILE_M).enumerate() {
                    let row = tile_m * TILE_M;
                    let prefetch = Prefetch {
                        rows: next,
                        pass: tile_m,
                        passes,
                    };
                    let sums = tile(x_tile, w_tile, prefetch);
                    for (i, sums) in sums.iter().enumerate().take(x_tile.len()) {
                        for (j, &sum) in sums.iter().enumerate().take(cols) {
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

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn portable_tile<const N: usize>(
    x: &[&[f32]],
    w: &[&[f32]; N],
    _prefetch: Prefetch,
) -> [[f32; N]; TILE_M] {
    let mut sums = [[0f32; N]; TILE_M];
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

    use super::{Prefetch, TILE_M};

    const LANES: usize = 8;

    /// 4×3 tiles: 12 accumulators, 3 weight vectors and 1 activation vector fill AVX2's 16
    /// registers.
    pub(super) fn tile_avx2(
        x: &[&[f32]],
        w: &[&[f32]; 3],
        prefetch: Prefetch,
    ) -> [[f32; 3]; TILE_M] {
        by_rows(x, w, prefetch)
    }

    /// 4×6 tiles: 24 accumulators and 6 weight vectors need AVX-512VL's 32 registers (still
    /// 256-bit arithmetic). Only called after `matmul_t` has detected AVX-512F and -VL.
    pub(super) fn tile_avx512(
        x: &[&[f32]],
        w: &[&[f32]; 6],
        prefetch: Prefetch,
    ) -> [[f32; 6]; TILE_M] {
        #[target_feature(enable = "avx512f,avx512vl")]
        unsafe fn wide(x: &[&[f32]], w: &[&[f32]; 6], prefetch: Prefetch) -> [[f32; 6]; TILE_M] {
            by_rows(x, w, prefetch)
        }
        // SAFETY: `matmul_t` picks this kernel only on CPUs with AVX-512F and AVX-512VL.
        unsafe { wide(x, w, prefetch) }
    }

    /// The tile for `x.len()` rows, each shape compiled on its own so that the accumulators
    /// are registers (inlined into its caller, with the caller's target features).
    #[inline(always)]
    fn by_rows<const N: usize>(
        x: &[&[f32]],
        w: &[&[f32]; N],
        prefetch: Prefetch,
    ) -> [[f32; N]; TILE_M] {
        match x.len() {
            4 => tile::<4, N>(x, w, prefetch),
            3 => tile::<3, N>(x, w, prefetch),
            2 => tile::<2, N>(x, w, prefetch),
            1 => tile::<1, N>(x, w, prefetch),
            rows => unreachable!("a tile of {rows} rows"),
        }
    }

    #[inline(always)]
    fn tile<const M: usize, const N: usize>(
        x: &[&[f32]],
        w: &[&[f32]; N],
        prefetch: Prefetch,
    ) -> [[f32; N]; TILE_M] {
        let k = x[0].len();
        assert!(x.len() == M);
        assert!(x
            .iter()
            .chain(w)
            .chain(prefetch.rows)
            .all(|row| row.len() == k));
        let body = k - k % LANES;
        let mut sums = [[0f32; N]; TILE_M];
        // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every load reads
        // LANES values at offset `at` < body ≤ k from a row of length k (asserted above).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); N]; M];
            let mut at = 0;
            // Lines to skip before this pass's next prefetch.
            let mut skip = prefetch.pass;
            while at < body {
                // Into L2 (measured faster here than into L1), at most one cache line (16
                // floats) per row every other step.
                if at % 16 == 0 {
                    if skip == 0 {
                        for row in prefetch.rows {
                            _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().add(at) as *const i8);
                        }
                        skip = prefetch.passes - 1;
                    } else {
                        skip -= 1;
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

    /// The AVX2 and AVX-512VL kernels give the same bits, so tokens do not depend on which
    /// one the CPU runs (on a CPU without AVX-512VL only the AVX2 kernel is checked).
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn kernels_agree_bit_for_bit() {
        let wide = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl");
        for (m, n, k) in [(1, 7, 13), (6, 100, 64), (16, 53, 200)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0)
                .collect();
            let narrow = matmul_with::<3>(&x, m, &w, n, k, simd::tile_avx2);
            assert_eq!(matmul_t(&x, m, &w, n, k), narrow);
            if wide {
                assert_eq!(matmul_with::<6>(&x, m, &w, n, k, simd::tile_avx512), narrow);
            }
        }
    }
}
