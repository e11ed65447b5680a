//! `spur loss` against values worked out by hand from the paper's formulas.

use serde_json::json;
use spur_rl::loss_from_json;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(close(got, want), "{what}: got {got}, want {want}");
}

fn assert_rows(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}[{i}]: length");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert_close(*a, *b, &format!("{what}[{i}][{j}]"));
        }
    }
}

/// One group, rewards [1, 0]: advantages ±0.5/std with std = sqrt(0.5) (unbiased), i.e.
/// ±1/√2 (less the 1e-9 in the denominator). Tokens exercise every clip case:
/// sample 0 (A > 0): ρ = 1 (inside), ρ = e^0.3 ≈ 1.35 (above 1.2: clipped high), ρ = e^-0.5
/// ≈ 0.61 (below 0.8 but A > 0: not clipped); sample 1 (A < 0): ρ = e^-0.5 (clipped low),
/// ρ = e^0.3 (above, but A < 0: not clipped).
fn clip_cases(config: serde_json::Value) -> serde_json::Value {
    json!({
        "config": config,
        "groups": [{
            "rewards": [1.0, 0.0],
            "samples": [
                {"logprobs": [-1.0, -0.7, -1.5], "old_logprobs": [-1.0, -1.0, -1.0]},
                {"logprobs": [-1.5, -0.7], "old_logprobs": [-1.0, -1.0]}
            ]
        }]
    })
}

#[test]
fn clipped_and_unclipped_tokens_on_both_sides() {
    let out = loss_from_json(&clip_cases(json!({}))).unwrap();
    let a = 0.5 / (0.5f64.sqrt() + 1e-9);
    let (up, down) = (0.3f64.exp(), (-0.5f64).exp());
    // Token losses: −A·1, −A·1.2 (clipped), −A·e^-0.5 ; +A·0.8 (clipped), +A·e^0.3.
    let sum = -a - a * 1.2 - a * down + a * 0.8 + a * up;
    // token_mean over one micro-batch of 5 tokens.
    assert_close(out.loss, sum / 5.0, "loss");
    assert_rows(&out.advantages, &[vec![a, -a]], "advantages");
    assert_rows(
        &out.grad_logprobs,
        &[
            vec![-a / 5.0, 0.0, -a * down / 5.0],
            vec![0.0, a * up / 5.0],
        ],
        "grad",
    );
    assert_close(out.clip_fraction, 2.0 / 5.0, "clip_fraction");
    assert_close(out.clip_fraction_low, 1.0 / 5.0, "clip_fraction_low");
    assert_close(out.clip_fraction_high, 1.0 / 5.0, "clip_fraction_high");
    // k3(π_old‖π) per token: ρ − 1 − log ρ.
    let k3 = |lr: f64| lr.exp() - 1.0 - lr;
    let kl = (k3(0.0) + 2.0 * k3(0.3) + 2.0 * k3(-0.5)) / 5.0;
    assert_close(out.approx_kl, kl, "approx_kl");
}

#[test]
fn without_clipping_every_token_gets_minus_rho_a() {
    let out = loss_from_json(&clip_cases(json!({"clip": false}))).unwrap();
    let a = 0.5 / (0.5f64.sqrt() + 1e-9);
    let (up, down) = (0.3f64.exp(), (-0.5f64).exp());
    let sum = -a - a * up - a * down + a * down + a * up;
    assert_close(out.loss, sum / 5.0, "loss");
    assert_rows(
        &out.grad_logprobs,
        &[
            vec![-a / 5.0, -a * up / 5.0, -a * down / 5.0],
            vec![a * down / 5.0, a * up / 5.0],
        ],
        "grad",
    );
    assert_eq!(out.clip_fraction, 0.0);
}

#[test]
fn asymmetric_clip_bounds() {
    // ε_high = 0.4: e^0.3 ≈ 1.35 is now inside for A > 0. ε_low = 0.1: ρ = 0.85 < 0.9 is
    // clipped for A < 0.
    let input = json!({
        "config": {"eps_low": 0.1, "eps_high": 0.4},
        "groups": [{
            "rewards": [1.0, 0.0],
            "samples": [
                {"logprobs": [-0.7], "old_logprobs": [-1.0]},
                {"logprobs": [-1.0 + 0.85f64.ln()], "old_logprobs": [-1.0]}
            ]
        }]
    });
    let out = loss_from_json(&input).unwrap();
    let a = 0.5 / (0.5f64.sqrt() + 1e-9);
    let up = 0.3f64.exp();
    assert_close(out.loss, (-a * up + a * 0.9) / 2.0, "loss");
    assert_rows(
        &out.grad_logprobs,
        &[vec![-a * up / 2.0], vec![0.0]],
        "grad",
    );
    assert_close(out.clip_fraction_low, 0.5, "low");
    assert_eq!(out.clip_fraction_high, 0.0);
}

/// Two groups, micro-batch 2 across the group boundary; the second group has equal rewards.
/// Samples (lengths): g0 [1, 3, 2], g1 [2, 1] → micro-batches {g0s0, g0s1} (4 tokens),
/// {g0s2, g1s0} (4 tokens), {g1s1} (1 token). ρ = 1 everywhere, so a token's loss is −A.
fn boundary_input(config: serde_json::Value) -> serde_json::Value {
    let s = |n: usize| json!({"logprobs": vec![-0.5; n], "old_logprobs": vec![-0.5; n]});
    json!({
        "config": config,
        "groups": [
            {"rewards": [1.0, 0.0, 0.0], "samples": [s(1), s(3), s(2)]},
            {"rewards": [1.0, 1.0], "samples": [s(2), s(1)]}
        ]
    })
}

#[test]
fn micro_batch_boundaries_and_zero_advantage_group() {
    let out = loss_from_json(&boundary_input(json!({"micro_batch": 2}))).unwrap();
    // rewards [1,0,0]: mean 1/3, deviations 2/3, −1/3, −1/3; unbiased variance 1/3.
    let std = (1.0f64 / 3.0).sqrt() + 1e-9;
    let (a0, a1) = ((2.0 / 3.0) / std, (-1.0 / 3.0) / std);
    assert_rows(
        &out.advantages,
        &[vec![a0, a1, a1], vec![0.0, 0.0]],
        "advantages",
    );
    // Micro-batch token means, averaged over the 3 micro-batches.
    let mb1 = (-a0 - 3.0 * a1) / 4.0;
    let mb2 = (-2.0 * a1) / 4.0;
    let mb3 = 0.0;
    assert_close(out.loss, (mb1 + mb2 + mb3) / 3.0, "loss");
    let g = |a: f64, tokens: f64| -a / (tokens * 3.0);
    assert_rows(
        &out.grad_logprobs,
        &[
            vec![g(a0, 4.0)],
            vec![g(a1, 4.0); 3],
            vec![g(a1, 4.0); 2],
            vec![0.0; 2],
            vec![0.0],
        ],
        "grad",
    );

    // One micro-batch holding everything: a plain token mean over 9 tokens.
    let out = loss_from_json(&boundary_input(json!({"micro_batch": 8}))).unwrap();
    assert_close(out.loss, (-a0 - 5.0 * a1) / 9.0, "loss, one micro-batch");
}

#[test]
fn other_aggregations_and_dr_grpo() {
    // seq_mean: mean over the 5 sequences of each one's token mean (micro-batching irrelevant).
    let std = (1.0f64 / 3.0).sqrt() + 1e-9;
    let (a0, a1) = ((2.0 / 3.0) / std, (-1.0 / 3.0) / std);
    let input = boundary_input(json!({"aggregation": "seq_mean", "micro_batch": 2}));
    let out = loss_from_json(&input).unwrap();
    assert_close(out.loss, (-a0 - a1 - a1) / 5.0, "seq_mean loss");
    assert_rows(
        &out.grad_logprobs,
        &[
            vec![-a0 / 5.0],
            vec![-a1 / 15.0; 3],
            vec![-a1 / 10.0; 2],
            vec![0.0; 2],
            vec![0.0],
        ],
        "seq_mean grad",
    );

    // Dr. GRPO: advantages without the std division, constant normaliser 5 × norm_length.
    let input = boundary_input(json!({
        "advantage": "dr_grpo", "aggregation": "token_sum_const", "norm_length": 10
    }));
    let out = loss_from_json(&input).unwrap();
    let (d0, d1) = (2.0 / 3.0, -1.0 / 3.0);
    assert_rows(
        &out.advantages,
        &[vec![d0, d1, d1], vec![0.0, 0.0]],
        "dr advantages",
    );
    assert_close(out.loss, (-d0 - 5.0 * d1) / 50.0, "token_sum_const loss");
    assert_close(out.grad_logprobs[1][2], -d1 / 50.0, "token_sum_const grad");
}

#[test]
fn kl_penalty_k1_and_k3() {
    // All advantages zero (equal rewards): only the KL term remains.
    let input = |estimator: &str| {
        json!({
            "config": {"kl_coef": 0.1, "kl_estimator": estimator},
            "groups": [{"rewards": [1.0, 1.0], "samples": [
                {"logprobs": [-1.0, -2.0], "old_logprobs": [-1.0, -2.0], "ref_logprobs": [-1.5, -1.0]},
                {"logprobs": [-0.5], "old_logprobs": [-0.5], "ref_logprobs": [-0.5]}
            ]}]
        })
    };
    let out = loss_from_json(&input("k1")).unwrap();
    assert_close(out.loss, 0.1 * (0.5 - 1.0 + 0.0) / 3.0, "k1 loss");
    assert_rows(
        &out.grad_logprobs,
        &[vec![0.1 / 3.0; 2], vec![0.1 / 3.0]],
        "k1 grad",
    );

    let out = loss_from_json(&input("k3")).unwrap();
    // k3 with d = ref − logπ: e^d − d − 1; ∂/∂logπ = 1 − e^d.
    let k3 = |d: f64| d.exp() - d - 1.0;
    assert_close(
        out.loss,
        0.1 * (k3(-0.5) + k3(1.0) + k3(0.0)) / 3.0,
        "k3 loss",
    );
    let g = |d: f64| 0.1 * (1.0 - d.exp()) / 3.0;
    assert_rows(
        &out.grad_logprobs,
        &[vec![g(-0.5), g(1.0)], vec![g(0.0)]],
        "k3 grad",
    );
}

#[test]
fn bad_input_names_the_json_path() {
    let err = |v: serde_json::Value| loss_from_json(&v).unwrap_err().to_string();

    let e = err(json!({"config": {"eps": 0.2}, "groups": []}));
    assert!(
        e.contains("`config`") && e.contains("unknown field `eps`"),
        "{e}"
    );

    let e = err(json!({"groups": [{"rewards": [1.0, "x"], "samples": []}]}));
    assert!(e.contains("`groups[0].rewards[1]`"), "{e}");

    let e = err(json!({"groups": [{"rewards": [1.0], "samples": [
        {"logprobs": [-1.0, -1.0], "old_logprobs": [-1.0]}
    ]}]}));
    assert!(e.contains("`groups[0].samples[0].old_logprobs`"), "{e}");

    let e = err(json!({"groups": [{"rewards": [1.0, 0.0], "samples": [
        {"logprobs": [-1.0], "old_logprobs": [-1.0]}
    ]}]}));
    assert!(
        e.contains("`groups[0].samples`") && e.contains("one reward per sample"),
        "{e}"
    );

    let e = err(
        json!({"config": {"kl_coef": 0.1}, "groups": [{"rewards": [1.0], "samples": [
            {"logprobs": [-1.0], "old_logprobs": [-1.0]}
        ]}]}),
    );
    assert!(e.contains("`groups[0].samples[0].ref_logprobs`"), "{e}");

    let e = err(json!({"groups": [], "extra": 1}));
    assert!(e.contains("`$.extra`"), "{e}");

    let e = err(json!({"groups": [{"rewards": [1.0], "samples": [
        {"logprobs": [-1.0], "old_logprobs": [-1.0], "logprob": [0.0]}
    ]}]}));
    assert!(e.contains("`groups[0].samples[0].logprob`"), "{e}");
}
