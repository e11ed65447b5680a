use std::path::PathBuf;

/// Everything that can go wrong while fetching, loading or running a model.
/// Each variant names the file (or hub id) involved and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    #[error("{path}: sha256 is {actual}, expected {expected}; the file is corrupt or not the pinned one (delete it and retry)")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: unsupported architecture {arch:?} (supported: llama, qwen2, olmo2)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor {tensor} has unsupported dtype {dtype} (supported: f32, f16, bf16 and GGUF quantised types)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: missing tensor {tensor}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("the default model is not at {path}, and fetching it failed: {problem}")]
    Fetch { path: PathBuf, problem: String },
    #[error("hub model {repo}: {file} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; download it once while online or unset HF_HUB_OFFLINE")]
    OfflineMissing {
        repo: String,
        file: String,
        cache: PathBuf,
    },
    #[error("hub model {repo}: cannot get {file}: {message}")]
    Hub {
        repo: String,
        file: String,
        message: String,
    },
    #[error("model spec {0:?} is neither `default`, an existing local path, nor a hub id of the form owner/name")]
    BadSpec(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid sampling request: {0}")]
    Request(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
