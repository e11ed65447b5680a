//! What the fused ops' tests share: deterministic inputs and a relative difference.

use candle_core::{DType, Device, Tensor};

/// Deterministic values in [-scale, scale].
pub(crate) fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A tensor's values as f32, flattened.
pub(crate) fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max(1, max |b|).
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (to_vec(a), to_vec(b));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Asserts that `grad`, autograd's gradient of a scalar loss with respect to `var`, matches
/// central differences of `loss` (h = 0.01) at every `stride`-th element; `var` is restored.
pub(crate) fn assert_central_differences(
    var: &candle_core::Var,
    grad: &Tensor,
    stride: usize,
    what: &str,
    loss: impl Fn() -> Tensor,
) {
    let base = to_vec(var.as_tensor());
    let grad = to_vec(grad);
    let set = |values: Vec<f32>| {
        var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap())
            .unwrap()
    };
    for i in (0..base.len()).step_by(stride) {
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut values = base.clone();
            values[i] += delta;
            set(values);
            loss().to_scalar::<f32>().unwrap() as f64
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        set(base.clone());
        let err = (numeric - grad[i] as f64).abs();
        assert!(
            err <= 2e-3 * (1.0 + numeric.abs()),
            "{what} element {i}: autograd {} vs numeric {numeric}",
            grad[i]
        );
    }
}
