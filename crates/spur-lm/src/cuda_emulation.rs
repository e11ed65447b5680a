//! spur's CUDA kernels run on the CPU, to be compared with the CPU ops they mirror: no GPU is
//! needed, so CI checks their indexing and arithmetic, and a lent GPU checks the rest
//! (`spur bench train-ops`). `tests/cuda_emulation/shim.h` runs a block's threads as OS
//! threads, with `__syncthreads` and warp shuffles as barriers; a scenario program per kernel
//! file reads inputs from files, launches the kernels and writes their outputs. It is built
//! with the system's C++20 compiler (`c++`, or `$CXX`). spur-rl's Adam tests use the same
//! harness (the `cuda-emulation` feature).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// spur-lm's kernel sources (with the prelude every kernel file starts from).
pub fn kernel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// Compiles the scenario program `source` (which includes `shim.h`, `prelude.cuh` and its
/// kernel file, found in `kernels` or spur-lm's directories), once per content: the binary is
/// named by a hash of every file it can include, so reruns reuse it and nothing piles up.
pub fn emulator(source: &Path, kernels: &Path) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(source) {
        return path.clone();
    }
    let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation");
    let includes = [shim.clone(), kernels.to_path_buf(), kernel_dir()];
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(
        &std::fs::read(source).expect("the scenario file"),
        &mut hasher,
    );
    for dir in &includes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("an include directory")
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        for file in files {
            std::hash::Hash::hash(&std::fs::read(&file).unwrap_or_default(), &mut hasher);
        }
    }
    let dir = std::env::temp_dir().join("spur-cuda-emulation");
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let name = source
        .file_stem()
        .expect("a scenario file")
        .to_string_lossy();
    let out = dir.join(format!(
        "{name}-{:016x}",
        std::hash::Hasher::finish(&hasher)
    ));
    if !out.exists() {
        // Built under a name of this process's, then renamed: concurrent test processes
        // never run a half-written binary.
        let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let mut command = Command::new(&compiler);
        command.args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off"]);
        for include in &includes {
            command.arg("-I").arg(include);
        }
        let status = command
            .arg(source)
            .arg("-o")
            .arg(&partial)
            .status()
            .unwrap_or_else(|e| panic!("running {compiler} (a C++20 compiler; install g++): {e}"));
        assert!(status.success(), "compiling {} failed", source.display());
        std::fs::rename(&partial, &out).expect("renaming the emulator into place");
    }
    built.insert(source.to_path_buf(), out.clone());
    out
}

/// Raw little-endian bytes of f32, u32 or f64 values.
pub fn bytes<T: Copy>(values: &[T]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| {
            // SAFETY: plain numbers, read as their bytes.
            unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
                .to_vec()
        })
        .collect()
}

/// Runs `scenario` of the `emulator` on the inputs and parameters; returns its f32 outputs.
pub fn run(
    emulator: &Path,
    scenario: &str,
    inputs: &[(&str, Vec<u8>)],
    params: &[(&str, f64)],
    outputs: &[&str],
) -> Vec<Vec<f32>> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (input, data) in inputs {
        std::fs::write(dir.path().join(format!("{input}.bin")), data).unwrap();
    }
    let params: String = params.iter().map(|(k, v)| format!("{k} {v:e}\n")).collect();
    std::fs::write(dir.path().join("params.txt"), params).unwrap();
    let status = Command::new(emulator)
        .arg(dir.path())
        .arg(scenario)
        .status()
        .expect("the emulator runs");
    assert!(status.success(), "emulated {scenario} failed");
    outputs
        .iter()
        .map(|o| {
            let raw = std::fs::read(dir.path().join(format!("{o}.bin"))).unwrap();
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{bytes, kernel_dir};
    use crate::decode_attention::{DecodeAttention, PromptColumns};
    use crate::engine::{choose_token, SamplingParams};
    use crate::test_util::{random, rel_diff, to_vec};
    use crate::train_ops::{self, RopeStyle};

    /// Runs `scenario` of spur-lm's emulator `name`.
    fn run(
        name: &str,
        scenario: &str,
        inputs: &[(&str, Vec<u8>)],
        params: &[(&str, f64)],
        outputs: &[&str],
    ) -> Vec<Vec<f32>> {
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/cuda_emulation/{name}.cpp"));
        super::run(
            &super::emulator(&source, &kernel_dir()),
            scenario,
            inputs,
            params,
            outputs,
        )
    }

    fn f32s(t: &Tensor) -> Vec<u8> {
        bytes(&to_vec(t))
    }

    /// `values` as a tensor of `like`'s shape, compared with it.
    fn assert_close(values: &[f32], like: &Tensor, what: &str) {
        let got = Tensor::from_vec(values.to_vec(), like.shape(), &Device::Cpu).unwrap();
        let diff = rel_diff(&got, &like.to_dtype(DType::F32).unwrap());
        assert!(
            diff < 1e-5,
            "{what}: the emulated kernel is {diff} from the CPU op"
        );
    }

    /// The output of `f` over `inputs` (as vars) and the gradients of Σ output ⊙ `g`.
    fn with_grads(
        inputs: &[Tensor],
        g: &Tensor,
        f: impl Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tensors);
        let grads = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        (out, grads)
    }

    #[test]
    fn rms_norm_kernels_match_the_cpu_op() {
        let (rows, n) = (5, 70);
        let (x, g) = (random(&[rows, n], 1, 2.0), random(&[rows, n], 2, 1.0));
        let w = random(&[n], 3, 0.5).affine(1.0, 1.0).unwrap();
        let eps = 1e-6;
        let (y, grads) = with_grads(&[x.clone(), w.clone()], &g, |t| {
            train_ops::rms_norm(&t[0], &t[1], eps).unwrap()
        });
        let inputs = [("x", f32s(&x)), ("w", f32s(&w)), ("g", f32s(&g))];
        // Two rows per block of the weight's gradient: three blocks, the last one short.
        let params = [("n", n as f64), ("eps", eps), ("block_rows", 2.0)];
        let out = run(
            "train_ops",
            "rms_norm",
            &inputs,
            &params,
            &["y", "dx", "dw"],
        );
        assert_close(&out[0], &y, "rms norm");
        assert_close(&out[1], &grads[0], "its input's gradient");
        assert_close(&out[2], &grads[1], "its weight's gradient");
    }

    #[test]
    fn rope_kernel_matches_the_cpu_op_in_both_layouts() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = random(&[b, h, t, d], 4, 1.0);
        let g = random(&[b, h, t, d], 5, 1.0);
        let angles = random(&[b, t, d / 2], 6, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for style in [RopeStyle::Half, RopeStyle::Interleaved] {
            let (y, grads) = with_grads(std::slice::from_ref(&x), &g, |t| {
                train_ops::rope(&t[0], &cos, &sin, style).unwrap()
            });
            let inputs = [
                ("x", f32s(&x)),
                ("cos", f32s(&cos)),
                ("sin", f32s(&sin)),
                ("g", f32s(&g)),
            ];
            let interleaved = (style == RopeStyle::Interleaved) as u8 as f64;
            let params = [
                ("h", h as f64),
                ("t", t as f64),
                ("half", (d / 2) as f64),
                ("interleaved", interleaved),
            ];
            let out = run("train_ops", "rope", &inputs, &params, &["y", "dx"]);
            assert_close(&out[0], &y, &format!("rope {style:?}"));
            assert_close(&out[1], &grads[0], &format!("rope {style:?}'s gradient"));
        }
    }

    #[test]
    fn swiglu_kernels_match_the_cpu_op() {
        let (gate, up) = (random(&[7, 33], 7, 4.0), random(&[7, 33], 8, 2.0));
        let g = random(&[7, 33], 9, 1.0);
        let (y, grads) = with_grads(&[gate.clone(), up.clone()], &g, |t| {
            train_ops::swiglu(&t[0], &t[1]).unwrap()
        });
        let inputs = [("gate", f32s(&gate)), ("up", f32s(&up)), ("g", f32s(&g))];
        let out = run("train_ops", "swiglu", &inputs, &[], &["y", "grads"]);
        assert_close(&out[0], &y, "swiglu");
        let both = Tensor::stack(&grads, 0).unwrap();
        assert_close(&out[1], &both, "swiglu's gradients");
    }

    #[test]
    fn packed_attention_kernels_match_the_cpu_op() {
        // Head dimension 40: lanes hold one or two dimensions each. Three sequences per row.
        let (b, heads, kv_heads, hd, lengths) = (2, 4, 2, 40, [5usize, 1, 7]);
        let t: usize = lengths.iter().sum();
        let q = random(&[b, heads, t, hd], 10, 1.0);
        let k = random(&[b, kv_heads, t, hd], 11, 1.0);
        let v = random(&[b, kv_heads, t, hd], 12, 1.0);
        let g = random(&[b, t, heads * hd], 13, 1.0);
        let (out, grads) = with_grads(&[q.clone(), k.clone(), v.clone()], &g, |x| {
            crate::train_attention::packed_attention(&x[0], &x[1], &x[2], &lengths).unwrap()
        });
        let start: Vec<u32> = lengths
            .iter()
            .scan(0u32, |at, &n| {
                let s = *at;
                *at += n as u32;
                Some(std::iter::repeat_n(s, n))
            })
            .flatten()
            .collect();
        let inputs = [
            ("q", f32s(&q)),
            ("k", f32s(&k)),
            ("v", f32s(&v)),
            ("g", f32s(&g)),
            ("start", bytes(&start)),
        ];
        let params = [
            ("heads", heads as f64),
            ("kv_heads", kv_heads as f64),
            ("t", t as f64),
            ("hd", hd as f64),
        ];
        let got = run(
            "train_attention",
            "attention",
            &inputs,
            &params,
            &["out", "dq", "dk", "dv"],
        );
        assert_close(&got[0], &out, "attention");
        for (i, what) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(&got[i + 1], &grads[i], what);
        }
    }

    #[test]
    fn decode_attention_kernel_matches_the_cpu_op_over_shared_prompts() {
        let (b, heads, kv_heads, hd, len, width) = (3, 4, 2, 40, 6, 5);
        let q = random(&[b, heads, 1, hd], 14, 1.0);
        let k = random(&[b, kv_heads, len, hd], 15, 1.0);
        let v = random(&[b, kv_heads, len, hd], 16, 1.0);
        let pk = random(&[2, kv_heads, width, hd], 17, 1.0);
        let pv = random(&[2, kv_heads, width, hd], 18, 1.0);
        let (pad, of_row, prompt_pad) = ([0usize, 2, 5], [1usize, 0, 1], [0usize, 3]);
        let scale = 1.0 / (hd as f32).sqrt();
        let op = DecodeAttention {
            pad: pad.to_vec(),
            scale,
            prompts: Some(PromptColumns {
                k: pk.clone(),
                v: pv.clone(),
                width,
                pad: prompt_pad.to_vec(),
                of_row: of_row.to_vec(),
            }),
            rows_on_device: None,
        };
        let want = q.apply_op3_no_bwd(&k, &v, &op).unwrap();
        let meta: Vec<u32> = (0..b)
            .flat_map(|r| [pad[r], of_row[r], prompt_pad[of_row[r]]].map(|x| x as u32))
            .collect();
        let inputs = [
            ("q", f32s(&q)),
            ("k", f32s(&k)),
            ("v", f32s(&v)),
            ("pk", f32s(&pk)),
            ("pv", f32s(&pv)),
            ("meta", bytes(&meta)),
        ];
        let params = [
            ("b", b as f64),
            ("heads", heads as f64),
            ("kv_heads", kv_heads as f64),
            ("hd", hd as f64),
            ("len", len as f64),
            ("width", width as f64),
            ("scale", scale as f64),
        ];
        let got = run("decode_attention", "decode", &inputs, &params, &["out"]);
        assert_close(&got[0], &want, "decode attention");
    }

    #[test]
    fn token_choice_kernel_chooses_as_choose_token_does() {
        // More tokens than threads, not a multiple of them; greedy and sampled rows.
        let (n, vocab) = (5, 300);
        let logits = to_vec(&random(&[n, vocab], 19, 6.0));
        let rows = [
            (0.0, 0.0),
            (0.25, 1.0),
            (0.5, 0.7),
            (0.999, 1.0),
            (0.61, 1.3),
        ];
        let flat_rows: Vec<f64> = rows.iter().flat_map(|&(d, t)| [d, t]).collect();
        let inputs = [("logits", bytes(&logits)), ("rows", bytes(&flat_rows))];
        let got = run(
            "choose_tokens",
            "choose",
            &inputs,
            &[("vocab", vocab as f64)],
            &["out"],
        );
        for (r, &(draw, temperature)) in rows.iter().enumerate() {
            let params = SamplingParams {
                temperature,
                ..SamplingParams::default()
            };
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (token, logprob) = choose_token(row, &params, || draw);
            assert_eq!(got[0][2 * r] as u32, token, "row {r}");
            assert!((got[0][2 * r + 1] - logprob).abs() < 1e-5, "row {r}");
        }
    }
}
