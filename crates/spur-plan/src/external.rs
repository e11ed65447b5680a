//! External content (weights, data, command input files) and its hashes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::Digest;
use spur_spec::{Experiment, Source};

use crate::Hash;

/// Content hashing of local files and directories, supplied by the caller
/// (the store remembers hashes by path, size, mtime and inode).
pub type Hasher<'a> = dyn Fn(&Path) -> std::io::Result<Hash> + Sync + 'a;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalKind {
    Model,
    Dataset,
    File,
}

#[derive(Debug, Clone)]
pub struct External {
    /// Where it is declared, e.g. `models.smollm2` or
    /// `commands.prepare.inputs.script:prep.py`.
    pub key: String,
    pub kind: ExternalKind,
    /// Content hash: the pin when given (verified against a local copy when
    /// one exists), else the hash of the local copy.
    pub hash: Hash,
    /// The first source that exists on this machine, if any.
    pub local: Option<PathBuf>,
    pub sources: Vec<Source>,
    pub pinned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("{key}: {path} has sha256 {actual}, but the experiment pins {pinned}\n  = help: if the new content is intended, update `sha256:` (or run `spur lock`); otherwise restore the file")]
    PinMismatch {
        key: String,
        path: PathBuf,
        actual: String,
        pinned: String,
    },
    #[error("{key}: no `sha256:` pin, no hub source, and no source is available locally (tried: {tried})\n  = help: add `sha256:` so the plan can be made without the content, or fix the path")]
    Unavailable { key: String, tried: String },
    #[error("{key}: cannot hash {path}: {source}")]
    Io {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Resolve a source's local path, relative to the experiment's directory.
pub fn local_path(dir: &Path, source: &Source) -> Option<PathBuf> {
    let p = Path::new(source.path.as_ref()?);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    full.exists().then_some(full)
}

fn resolve(
    key: String,
    kind: ExternalKind,
    sources: &[Source],
    pin: Option<&str>,
    dir: &Path,
    hasher: &Hasher<'_>,
) -> Result<External, ExternalError> {
    let local = sources.iter().find_map(|s| local_path(dir, s));
    let hash_local = |path: &Path| {
        hasher(path).map_err(|source| ExternalError::Io {
            key: key.clone(),
            path: path.to_path_buf(),
            source,
        })
    };
    let hash = match (pin.and_then(Hash::from_hex), &local) {
        (Some(pinned), Some(path)) => {
            let actual = hash_local(path)?;
            if actual != pinned {
                return Err(ExternalError::PinMismatch {
                    key,
                    path: path.clone(),
                    actual: actual.hex(),
                    pinned: pinned.hex(),
                });
            }
            pinned
        }
        (Some(pinned), None) => pinned,
        (None, Some(path)) => hash_local(path)?,
        // A hub repository without a pin is identified by name and revision
        // (a commit id pins it; a branch name does not).
        (None, None) if sources.iter().any(|s| s.hub.is_some()) => {
            let s = sources
                .iter()
                .find(|s| s.hub.is_some())
                .expect("checked above");
            let id = format!(
                "hub\0{}\0{}\0{}",
                s.hub.as_deref().unwrap_or_default(),
                s.revision.as_deref().unwrap_or("main"),
                s.file.as_deref().unwrap_or_default()
            );
            Hash(sha2::Sha256::digest(id.as_bytes()).into())
        }
        (None, None) => {
            let tried = sources
                .iter()
                .map(Source::describe)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ExternalError::Unavailable { key, tried });
        }
    };
    Ok(External {
        key,
        kind,
        hash,
        local,
        sources: sources.to_vec(),
        pinned: pin.is_some(),
    })
}

/// Key of a command input file as planned for one run.
pub(crate) fn command_input_key(command: &str, input: &str, path: &str) -> String {
    format!("commands.{command}.inputs.{input}:{path}")
}

/// Every external input some run reads, hashed once each.
pub fn collect(exp: &Experiment, hasher: &Hasher<'_>) -> Result<Vec<External>, ExternalError> {
    let mut wanted: BTreeMap<String, (ExternalKind, Vec<Source>, Option<String>)> = BTreeMap::new();
    for run in &exp.runs {
        let p = &run.params;
        let mut model = |name: &str| {
            let m = &exp.models[name];
            wanted.insert(
                format!("models.{name}"),
                (ExternalKind::Model, m.sources.clone(), m.sha256.clone()),
            );
        };
        if exp.trains || exp.evaluates {
            if let Some(m) = &p.model {
                model(m);
            }
            if let Some(label_model) = run.reward.as_ref().and_then(|r| r.label_model.as_ref()) {
                model(label_model);
            }
        }
        let mut datasets: Vec<&str> = Vec::new();
        if exp.trains {
            datasets.extend(p.train_data.as_deref());
            datasets.extend(p.probe.dataset.as_deref());
        }
        if exp.evaluates {
            datasets.extend(p.evals.values().filter_map(|e| e.dataset.as_deref()));
        }
        for name in datasets {
            let d = &exp.datasets[name];
            wanted.insert(
                format!("datasets.{name}"),
                (ExternalKind::Dataset, d.sources.clone(), d.sha256.clone()),
            );
        }
        for cmd in &exp.command_order {
            for (input, raw) in &exp.commands[cmd].inputs {
                let path = spur_spec::substitute_str(raw, &mut |n| run.lookup(n))
                    .map(|v| spur_spec::scalar_text(&v))
                    .unwrap_or_else(|_| raw.clone());
                let source = Source {
                    path: Some(path.clone()),
                    hub: None,
                    pip: None,
                    file: None,
                    revision: None,
                };
                wanted.insert(
                    command_input_key(cmd, input, &path),
                    (ExternalKind::File, vec![source], None),
                );
            }
        }
    }
    wanted
        .into_iter()
        .map(|(key, (kind, sources, pin))| {
            resolve(key, kind, &sources, pin.as_deref(), &exp.dir, hasher)
        })
        .collect()
}
