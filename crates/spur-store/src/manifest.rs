//! The record a finished node leaves in the cache.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{hash_reader, io_err, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeManifest {
    pub id: String,
    pub kind: String,
    pub version: u32,
    pub step: u32,
    /// Input node ids, in role order.
    pub inputs: Vec<String>,
    /// External content hashes read by the node.
    pub externals: Vec<String>,
    /// The parameters the stage read.
    pub params: serde_json::Value,
    /// Relative path under `out/` → size and sha256.
    pub artifacts: BTreeMap<String, Artifact>,
    /// Artifacts deleted by the materialisation policy.
    #[serde(default)]
    pub pruned: Vec<String>,
    /// Stage-reported metrics (loss, accuracy, tokens/s…).
    #[serde(default)]
    pub metrics: serde_json::Value,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    pub host: String,
    pub spur_version: String,
}

/// Size and sha256 of every file under `out`, by relative path.
pub(crate) fn hash_tree(out: &Path) -> Result<BTreeMap<String, Artifact>> {
    let mut artifacts = BTreeMap::new();
    // Hard links to one file (a checkpoint's weights shared by two
    // directories) are read once.
    let mut by_inode: HashMap<(u64, u64), Artifact> = HashMap::new();
    for entry in walkdir::WalkDir::new(out).sort_by_file_name() {
        let entry = entry.map_err(|e| io_err(out)(e.into()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(out)
            .expect("walk stays inside")
            .to_string_lossy()
            .into_owned();
        let meta = entry.metadata().map_err(|e| io_err(path)(e.into()))?;
        let artifact = match by_inode.get(&(meta.dev(), meta.ino())) {
            Some(same) => same.clone(),
            None => Artifact {
                size: meta.len(),
                sha256: hash_and_sync(path).map_err(io_err(path))?.hex(),
            },
        };
        if meta.nlink() > 1 {
            by_inode.insert((meta.dev(), meta.ino()), artifact.clone());
        }
        artifacts.insert(rel, artifact);
    }
    Ok(artifacts)
}

/// The file's sha256, after its data is on disk: a published node must
/// survive a crash, not only a killed process.
fn hash_and_sync(path: &Path) -> std::io::Result<spur_core::Hash> {
    let file = std::fs::File::open(path)?;
    let hash = hash_reader(&file)?;
    file.sync_all()?;
    Ok(hash)
}

/// The key of the manifest's own sha256, written last: the sha256 is over
/// the bytes before it (the manifest without this key, as spur writes it),
/// so checking needs no re-serialisation that could round floats.
const SEAL_KEY: &str = "manifest_sha256";

/// The manifest's bytes as stored, ending with its own sha256.
pub(crate) fn seal(manifest: &NodeManifest) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(manifest).expect("manifests serialise");
    let digest = hex::encode(Sha256::digest(&bytes));
    let closing = bytes.split_off(bytes.len() - 2);
    debug_assert_eq!(closing, b"\n}");
    bytes.extend_from_slice(format!(",\n  \"{SEAL_KEY}\": \"{digest}\"\n}}").as_bytes());
    bytes
}

/// Why stored manifest bytes are not a manifest spur wrote.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unsealed {
    #[error("invalid manifest: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("the manifest records no sha256 of itself (`{SEAL_KEY}`): written by a spur older than manifest checks, or edited")]
    NoSeal,
    #[error("the manifest was changed after spur wrote it: its content no longer matches the sha256 it records")]
    Edited,
}

/// Parse stored manifest bytes, checking them against their own sha256.
pub(crate) fn unseal(bytes: &[u8]) -> std::result::Result<NodeManifest, Unsealed> {
    #[derive(Deserialize)]
    struct Seal {
        manifest_sha256: Option<String>,
    }
    let manifest: NodeManifest = serde_json::from_slice(bytes)?;
    let seal: Seal = serde_json::from_slice(bytes)?;
    let recorded = seal.manifest_sha256.ok_or(Unsealed::NoSeal)?;
    let tail = format!(",\n  \"{SEAL_KEY}\": \"{recorded}\"\n}}");
    let body = bytes
        .strip_suffix(tail.as_bytes())
        .ok_or(Unsealed::Edited)?;
    let mut h = Sha256::new();
    h.update(body);
    h.update(b"\n}");
    if hex::encode(h.finalize()) != recorded {
        return Err(Unsealed::Edited);
    }
    Ok(manifest)
}
