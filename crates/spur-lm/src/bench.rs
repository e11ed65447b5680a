//! Speed measurements of models and engines, the library half of `spur bench models`,
//! `spur bench generate` and the matrix-product peak `spur bench update` reports its
//! utilisation against. They measure what this crate does, so they live here; the commands
//! parse arguments and print, and the scripts that set them beside llama.cpp, transformers and
//! PyTorch (`scripts/bench-vs-llamacpp.sh`, `scripts/gpu-check.sh`) read their JSON.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::engine::{CandleEngine, Engine, GenerationRequest, SamplingParams};
use crate::memory::PeakMemory;
use crate::{KvCache, LoadOptions, LoadedModel, ModelFiles, Precision, PromptTemplate, Result};

/// Best matrix-product throughput of `dtype` over a few square sizes on `device`, in FLOP/s.
pub fn matmul_peak(device: &Device, dtype: DType) -> Result<f64> {
    let sizes: &[usize] = if device.is_cpu() {
        &[512, 1024, 2048]
    } else {
        &[4096, 8192]
    };
    let mut best = 0.0f64;
    for &n in sizes {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        a.matmul(&b)?; // warm-up
        device.synchronize()?;
        let reps = if device.is_cpu() {
            (4096 / n).max(2)
        } else {
            20
        };
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                a.matmul(&b)?;
            }
            device.synchronize()?;
            let flops = 2.0 * (n * n * n) as f64 * reps as f64;
            best = best.max(flops / t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What `spur bench models` measures of one set of weights, in the shape llama.cpp's
/// `llama-bench` and `llama-batched-bench` do: one prompt, then `steps` greedy decode steps
/// for each of `batch` copies of it.
pub struct ModelBench {
    pub device: Device,
    /// Decode batch sizes, each one timed run.
    pub batches: Vec<usize>,
    /// Decode steps per sequence.
    pub steps: usize,
    /// Also time the whole candle engine (sampling at T = 1) at the largest batch.
    pub engine: bool,
}

/// Aggregate decode speed at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRun {
    pub batch: usize,
    pub tok_s: f64,
}

/// The candle engine's end-to-end sampling speed (prefill included).
#[derive(Clone, Debug, Serialize)]
pub struct EngineRun {
    pub samples: usize,
    pub tokens: usize,
    pub tok_s: f64,
}

/// One set of weights, measured.
#[derive(Clone, Debug, Serialize)]
pub struct ModelMeasurement {
    /// `f32`, `bf16` or `quantized`.
    pub precision: &'static str,
    pub load_s: f64,
    pub prompt_tokens: usize,
    /// Best of three batch-1 prefills.
    pub prefill_tok_s: f64,
    pub decode: Vec<DecodeRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineRun>,
    pub peak_rss_bytes: Option<u64>,
}

impl ModelBench {
    /// Loads `files` in `precision` and times the prefill of `problem` in the model's chat
    /// template, then decoding (and the engine, when asked). Progress goes to stderr.
    pub fn measure(
        &self,
        files: &ModelFiles,
        precision: Precision,
        problem: &str,
    ) -> Result<ModelMeasurement> {
        let options = LoadOptions {
            precision,
            device: self.device.clone(),
            ..LoadOptions::default()
        };
        let started = Instant::now();
        let loaded = crate::load_files(files.clone(), &options)?;
        let load_s = started.elapsed().as_secs_f64();
        let prompt = PromptTemplate::Chat { system: None }.render(&loaded.tokenizer, problem)?;
        let ids = loaded.tokenizer.encode(&prompt)?;
        let (prefill_tok_s, cache) = prefill(&loaded, &ids)?;
        eprintln!(
            "{precision:?}: prefill of {} tokens: {prefill_tok_s:.0} tok/s",
            ids.len()
        );
        let mut decode_runs = Vec::new();
        for &batch in &self.batches {
            let tok_s = decode(&loaded, &cache, batch, self.steps)?;
            eprintln!("{precision:?}: decode batch {batch}: {tok_s:.1} tok/s");
            decode_runs.push(DecodeRun { batch, tok_s });
        }
        let prompt_tokens = ids.len();
        let engine = if self.engine {
            Some(self.engine_run(loaded, ids)?)
        } else {
            None
        };
        Ok(ModelMeasurement {
            precision: match precision {
                Precision::F32 => "f32",
                Precision::Bf16 => "bf16",
                Precision::Quantized => "quantized",
            },
            load_s,
            prompt_tokens,
            prefill_tok_s,
            decode: decode_runs,
            engine,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }

    /// The candle engine sampling `steps` tokens at T = 1 for the largest batch.
    fn engine_run(&self, loaded: LoadedModel, prompt_ids: Vec<u32>) -> Result<EngineRun> {
        let batch = self.batches.iter().copied().max().unwrap_or(1);
        let LoadedModel {
            model, tokenizer, ..
        } = loaded;
        let engine = CandleEngine::new(Arc::new(model), Arc::new(tokenizer)).with_max_batch(batch);
        let request = GenerationRequest {
            prompt_ids,
            n: batch,
            params: SamplingParams {
                temperature: 1.0,
                max_new_tokens: self.steps,
                seed: 1,
                ..SamplingParams::default()
            },
        };
        let start = Instant::now();
        let out = engine.generate(&[request])?;
        let tokens: usize = out.iter().map(|c| c.token_ids.len()).sum();
        Ok(EngineRun {
            samples: batch,
            tokens,
            tok_s: tokens as f64 / start.elapsed().as_secs_f64(),
        })
    }
}

/// Best of three prefills of `ids` at batch 1 (the first warms caches and thread pools).
fn prefill(loaded: &LoadedModel, ids: &[u32]) -> Result<(f64, KvCache)> {
    let input = Tensor::new(ids, loaded.model.device())?.unsqueeze(0)?;
    let mut best = 0f64;
    let mut cache = None;
    for _ in 0..3 {
        let mut c = loaded.model.new_cache(1, ids.len())?;
        let start = Instant::now();
        loaded.model.forward_cached(&input, &mut c)?;
        best = best.max(ids.len() as f64 / start.elapsed().as_secs_f64());
        cache = Some(c);
    }
    Ok((best, cache.expect("three prefills ran")))
}

/// Aggregate tokens/s of `steps` greedy decode steps for `batch` rows continuing the prompt.
fn decode(loaded: &LoadedModel, prompt: &KvCache, batch: usize, steps: usize) -> Result<f64> {
    let mut cache = KvCache::continuing(&vec![(0, prompt); batch], steps)?;
    // A newline token as the first input: every row then follows its own greedy path.
    let newline = loaded.tokenizer.encode("\n")?.first().copied().unwrap_or(0);
    let mut next = vec![newline; batch];
    let start = Instant::now();
    for _ in 0..steps {
        let input = Tensor::new(next.as_slice(), loaded.model.device())?.unsqueeze(1)?;
        let logits = loaded.model.forward_cached(&input, &mut cache)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
}

/// One timed generation of `spur bench generate`.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationRun {
    pub batch: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tok_s: f64,
    /// Device memory in use at its peak (the process's resident high-water mark on a CPU).
    pub peak_memory_bytes: Option<u64>,
    /// The memory model's figure for the candle engine at this batch.
    pub estimated_memory_bytes: Option<u64>,
    /// The first sequence's tokens, to compare with another framework's greedy output.
    pub first_token_ids: Option<Vec<u32>>,
    /// With [`Generation::static_rows`]: tokens/s of the same number of sequences generated
    /// as static batches of that many rows, one after the other, each until its longest
    /// sequence ends (as Hugging Face `generate` batches), for the ratio to `tok_s`.
    pub static_tok_s: Option<f64>,
}

/// What `spur bench generate` times: for each batch size, that many sequences of one prompt,
/// prefill included, each up to `max_tokens` long.
pub struct Generation<'a> {
    pub prompt_ids: &'a [u32],
    pub batches: &'a [usize],
    pub max_tokens: usize,
    /// 0 decodes greedily (every sequence the same length); above it, sampled sequences end
    /// at different lengths, which is what continuous batching is for.
    pub temperature: f64,
    pub seed: u64,
    /// Also time each batch as static batches of this many rows.
    pub static_rows: Option<usize>,
}

impl Generation<'_> {
    fn request(&self, n: usize, max_new_tokens: usize, seed: u64) -> GenerationRequest {
        GenerationRequest {
            prompt_ids: self.prompt_ids.to_vec(),
            n,
            params: SamplingParams {
                temperature: self.temperature,
                max_new_tokens,
                seed,
                ..SamplingParams::default()
            },
        }
    }

    /// Times each batch on `engine`. A short run first loads kernels and fills allocators.
    /// `estimate` gives the memory model's figure for a batch. Progress goes to stderr.
    pub fn measure(
        &self,
        engine: &dyn Engine,
        device: &Device,
        estimate: impl Fn(usize) -> Option<u64>,
    ) -> Result<Vec<GenerationRun>> {
        engine.generate(&[self.request(1, 4, self.seed)])?;
        let mut runs = Vec::with_capacity(self.batches.len());
        for &batch in self.batches {
            device.synchronize()?;
            let peak = PeakMemory::start(device);
            let start = Instant::now();
            let completions =
                engine.generate(&[self.request(batch, self.max_tokens, self.seed)])?;
            let seconds = start.elapsed().as_secs_f64();
            let peak_memory_bytes = peak.finish();
            let tokens: usize = completions.iter().map(|c| c.token_ids.len()).sum();
            let tok_s = tokens as f64 / seconds;
            eprintln!("batch {batch}: {tokens} tokens in {seconds:.2} s, {tok_s:.1} tok/s");
            let static_tok_s = match self.static_rows {
                Some(rows) => Some(self.static_batches(engine, device, batch, rows)?),
                None => None,
            };
            runs.push(GenerationRun {
                batch,
                tokens,
                seconds,
                tok_s,
                peak_memory_bytes,
                estimated_memory_bytes: estimate(batch),
                first_token_ids: completions.first().map(|c| c.token_ids.clone()),
                static_tok_s,
            });
        }
        Ok(runs)
    }

    /// Tokens/s of `batch` sequences as static batches of `rows`, one call each (so no row
    /// is refilled); each batch draws with its own seed.
    fn static_batches(
        &self,
        engine: &dyn Engine,
        device: &Device,
        batch: usize,
        rows: usize,
    ) -> Result<f64> {
        let rows = rows.max(1);
        let (mut tokens, mut seconds) = (0usize, 0f64);
        for (k, start) in (0..batch).step_by(rows).enumerate() {
            let n = rows.min(batch - start);
            device.synchronize()?;
            let t = Instant::now();
            let out =
                engine.generate(&[self.request(n, self.max_tokens, self.seed + 1 + k as u64)])?;
            device.synchronize()?;
            seconds += t.elapsed().as_secs_f64();
            tokens += out.iter().map(|c| c.token_ids.len()).sum::<usize>();
        }
        let tok_s = tokens as f64 / seconds;
        eprintln!("batch {batch} as static batches of {rows}: {tokens} tokens, {tok_s:.1} tok/s");
        Ok(tok_s)
    }
}

/// How far a kernel on one device may be from the CPU's in `dtype`: 1e-5 in f32 (another
/// order of sums); 1e-2 in 16-bit floats, about two rounding steps of bf16.
pub fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// One of the fused training ops on a device, against its CPU kernel (agreement) and against
/// candle's composite ops on the same device (speed): what `spur bench train-ops` prints, one
/// per op and dtype.
#[derive(Clone, Debug, Serialize)]
pub struct TrainOpCheck {
    /// `rms_norm`, `rope_half`, `rope_interleaved`, `swiglu`, `attention` (causal, over four
    /// packed sequences), or spur-rl's `adam`.
    pub op: &'static str,
    pub dtype: String,
    /// The shape of the op's first input.
    pub shape: Vec<usize>,
    /// Largest |device − CPU| over the output, relative to the CPU output's largest magnitude.
    pub forward_error: f64,
    /// The same over each input's gradient, the largest of them.
    pub gradient_error: f64,
    /// Whether both errors are within `tolerance` ([`tolerance`]).
    pub agrees: bool,
    pub tolerance: f64,
    /// Forward and backward pass through spur's kernel on the device, best of five, in ms.
    pub fused_ms: f64,
    /// The same through candle's composite ops.
    pub composite_ms: f64,
}

/// The shapes [`check_train_ops`] uses: Qwen2.5-Math-1.5B's, over `tokens` packed tokens.
pub struct TrainOpShapes {
    pub tokens: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
}

impl TrainOpShapes {
    /// Qwen2.5-Math-1.5B over a micro-batch of 4 × 623 tokens (`scripts/gpu-check.sh`'s).
    pub fn qwen_1_5b(tokens: usize) -> Self {
        TrainOpShapes {
            tokens,
            hidden: 1536,
            heads: 12,
            kv_heads: 2,
            head_dim: 128,
            intermediate: 8960,
        }
    }
}

/// A fused training op and its composite twin, over inputs on one device.
struct TrainOp {
    name: &'static str,
    fused: fn(&[Tensor]) -> Result<Tensor>,
    composite: fn(&[Tensor]) -> Result<Tensor>,
    /// Inputs that take a gradient (rotary tables do not).
    trained: usize,
}

const RMS_EPS: f64 = 1e-6;

/// Four sequences of about equal length in `t` tokens, as a packed micro-batch holds them.
fn four_sequences(t: usize) -> Vec<usize> {
    (0..4)
        .map(|i| (i + 1) * t / 4 - i * t / 4)
        .filter(|&n| n > 0)
        .collect()
}

fn train_op_list() -> [TrainOp; 5] {
    use crate::train_attention::{packed_attention, packed_attention_composite};
    use crate::train_ops::{self as ops, RopeStyle};
    [
        TrainOp {
            name: "rms_norm",
            fused: |x| ops::rms_norm_fused(&x[0], &x[1], RMS_EPS),
            composite: |x| ops::rms_norm_composite(&x[0], &x[1], RMS_EPS),
            trained: 2,
        },
        TrainOp {
            name: "rope_half",
            fused: |x| ops::rope_fused(&x[0], &x[1], &x[2], RopeStyle::Half),
            composite: |x| ops::rope_composite(&x[0], &x[1], &x[2], RopeStyle::Half),
            trained: 1,
        },
        TrainOp {
            name: "rope_interleaved",
            fused: |x| ops::rope_fused(&x[0], &x[1], &x[2], RopeStyle::Interleaved),
            composite: |x| ops::rope_composite(&x[0], &x[1], &x[2], RopeStyle::Interleaved),
            trained: 1,
        },
        TrainOp {
            name: "swiglu",
            fused: |x| ops::swiglu_fused(&x[0], &x[1]),
            composite: |x| ops::swiglu_composite(&x[0], &x[1]),
            trained: 2,
        },
        TrainOp {
            name: "attention",
            fused: |x| packed_attention(&x[0], &x[1], &x[2], &four_sequences(x[0].dim(2)?)),
            composite: |x| {
                packed_attention_composite(&x[0], &x[1], &x[2], &four_sequences(x[0].dim(2)?))
            },
            trained: 3,
        },
    ]
}

/// Random inputs of `op` on the CPU (f32; the caller casts them).
fn train_op_inputs(op: &str, s: &TrainOpShapes) -> Result<Vec<Tensor>> {
    let cpu = Device::Cpu;
    let normal = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, &cpu)?) };
    let t = s.tokens;
    Ok(match op {
        "rms_norm" => vec![
            normal(&[t, s.hidden])?,
            normal(&[s.hidden])?.affine(0.1, 1.0)?,
        ],
        "swiglu" => vec![normal(&[t, s.intermediate])?, normal(&[t, s.intermediate])?],
        "attention" => {
            let kv = [1, s.kv_heads, t, s.head_dim];
            vec![
                normal(&[1, s.heads, t, s.head_dim])?,
                normal(&kv)?,
                normal(&kv)?,
            ]
        }
        _ => {
            // Angles of positions 0..t, as a packed row's first sequence has.
            let half = s.head_dim / 2;
            let angles: Vec<f32> = (0..t * half)
                .map(|i| (i / half) as f32 * 1e6f32.powf(-((i % half) as f32) / half as f32))
                .collect();
            let angles = Tensor::from_vec(angles, (1, t, half), &cpu)?;
            vec![
                normal(&[1, s.heads, t, s.head_dim])?,
                angles.cos()?,
                angles.sin()?,
            ]
        }
    })
}

/// The output and the gradients of `Σ output ⊙ weights` with respect to the first `trained`
/// inputs, all as f32 on the CPU. Random `weights` give every output element its own gradient.
fn forward_backward(
    f: fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    trained: usize,
    weights: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs[..trained]
        .iter()
        .map(candle_core::Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[trained..].iter().cloned());
    let out = f(&args)?;
    let loss = (out.to_dtype(DType::F32)? * weights)?.sum_all()?;
    let grads = loss.backward()?;
    let grads = vars
        .iter()
        .map(|v| {
            let g = grads.get(v).ok_or_else(|| {
                crate::Error::Request("an input of a training op got no gradient".into())
            })?;
            Ok(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?, grads))
}

/// max |a − b| / max |b|.
pub fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff as f64 / (scale as f64).max(f64::MIN_POSITIVE))
}

/// Each fused training op in f32 and bf16 on `device`: its output and gradients against the
/// CPU kernel's on the same inputs, and its forward and backward time against candle's
/// composite ops. On the CPU the agreement is the kernel's with itself, and the times compare
/// the CPU kernels with candle's composite ops.
pub fn check_train_ops(device: &Device, shapes: &TrainOpShapes) -> Result<Vec<TrainOpCheck>> {
    let mut checks = Vec::new();
    for op in train_op_list() {
        let inputs = train_op_inputs(op.name, shapes)?;
        for dtype in [DType::F32, DType::BF16] {
            let cast = |d: &Device| -> Result<Vec<Tensor>> {
                let mut out = Vec::with_capacity(inputs.len());
                for (i, x) in inputs.iter().enumerate() {
                    // The norm weight stays f32: the ops read it so (it is a master weight).
                    let keep_f32 = op.name == "rms_norm" && i == 1;
                    let x = if keep_f32 {
                        x.clone()
                    } else {
                        x.to_dtype(dtype)?
                    };
                    out.push(x.to_device(d)?);
                }
                Ok(out)
            };
            let (on_cpu, on_device) = (cast(&Device::Cpu)?, cast(device)?);
            let shape = inputs[0].dims().to_vec();
            let out_shape = (op.fused)(&on_cpu)?.dims().to_vec();
            let weights = Tensor::randn(0f32, 1.0, out_shape.as_slice(), &Device::Cpu)?;
            let device_weights = weights.to_device(device)?;
            let (want, want_grads) = forward_backward(op.fused, &on_cpu, op.trained, &weights)?;
            let (got, got_grads) =
                forward_backward(op.fused, &on_device, op.trained, &device_weights)?;
            let forward_error = relative_error(&got, &want)?;
            let mut gradient_error = 0f64;
            for (g, w) in got_grads.iter().zip(&want_grads) {
                gradient_error = gradient_error.max(relative_error(g, w)?);
            }
            let time = |f: fn(&[Tensor]) -> Result<Tensor>| -> Result<f64> {
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    device.synchronize()?;
                    let start = Instant::now();
                    forward_backward(f, &on_device, op.trained, &device_weights)?;
                    device.synchronize()?;
                    best = best.min(start.elapsed().as_secs_f64() * 1e3);
                }
                Ok(best)
            };
            let tolerance = tolerance(dtype);
            checks.push(TrainOpCheck {
                op: op.name,
                dtype: format!("{dtype:?}").to_lowercase(),
                shape,
                forward_error,
                gradient_error,
                agrees: forward_error <= tolerance && gradient_error <= tolerance,
                tolerance,
                fused_ms: time(op.fused)?,
                composite_ms: time(op.composite)?,
            });
        }
    }
    Ok(checks)
}
