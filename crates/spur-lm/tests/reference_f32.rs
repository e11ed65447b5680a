//! Our f32 model (GGUF dequantised, Llama q/k rows un-permuted, Hugging Face rope) against
//! candle-transformers' independent `quantized_llama` run with CANDLE_DEQUANTIZE_ALL=1, i.e.
//! in f32 from the same dequantised weights. Its own test binary: the variable is read once
//! per thread by candle and would change the quantised path of other tests.

use candle_core::{Device, Tensor, D};
use spur_lm::source::{default_cache_dir, ensure_default_model};
use spur_lm::{load_files, LoadOptions, ModelFiles, Precision};

#[test]
fn f32_logits_match_candle_transformers_in_f32() {
    let path = ensure_default_model(&default_cache_dir()).expect("fetch the default model");
    let ours = load_files(
        ModelFiles::Gguf { path: path.clone() },
        &LoadOptions {
            precision: Precision::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let ids = ours
        .tokenizer
        .encode("<|im_start|>user\nWhat is the capital of France? Tell me about it.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = ours.model.forward(&input).unwrap().squeeze(0).unwrap();
    let ours_last = logits.get(ids.len() - 1).unwrap();

    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let expected = std::thread::spawn(move || {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )
        .unwrap();
        reference.forward(&input, 0).unwrap().squeeze(0).unwrap()
    })
    .join()
    .unwrap();
    let diff = (&ours_last - &expected)
        .unwrap()
        .abs()
        .unwrap()
        .max(D::Minus1)
        .unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(
        diff < 1e-3,
        "f32 logits differ from the reference by {diff}"
    );
}
