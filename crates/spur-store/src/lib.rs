//! The content-addressed cache under `cache/` (or `--cache DIR`, `SPUR_CACHE`).
//!
//! Layout:
//! ```text
//! nodes/ab/<id>/manifest.json   a finished node: artifacts' sizes and sha256, metrics
//! nodes/ab/<id>/out/…           its artifacts
//! tmp/<id>.<pid>.<n>/           a node being computed (never read)
//! locks/ab/<id>.lock            held while a process computes <id>
//! quarantine/<id>.<time>/       entries found corrupted (kept for inspection)
//! runs/<run id>.json            run records
//! hashes/<sha256 of path>.json  remembered content hashes of big inputs
//! ```
//! A node directory appears only by `rename` of a fully written, fsynced
//! temporary directory, so a node is either absent or complete; its artifacts
//! are verified against the manifest's sha256 when read, and the manifest
//! against its own sha256 (its last key). A directory without a manifest is
//! no entry. The cache never follows a symbolic link of its own layout.

mod hashing;
mod manifest;
mod record;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use spur_core::Hash;

pub use hashing::{hash_file, hash_reader};
pub use manifest::{Artifact, NodeManifest};
pub use record::{
    ExperimentRef, GitState, Host, NodeEntry, NodeState, Provenance, RunRecord, RunStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache entry {id} is corrupted: {problem}")]
    Corrupted { id: String, problem: String },
    #[error("{path}: invalid manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not a run record this spur can read ({source}); `spur run` rewrites it")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("output `{name}` was declared but not created")]
    MissingOutput { name: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct Store {
    root: PathBuf,
    /// Node ids whose artifacts were verified by this process.
    verified: Mutex<HashSet<Hash>>,
    /// In-process memo of content hashes (the on-disk memo survives runs).
    hashes: hashing::Memo,
    counter: AtomicU64,
}

/// A node being computed: write artifacts under [`Staging::out`], then
/// [`Store::publish`].
pub struct Staging {
    pub id: Hash,
    dir: PathBuf,
}

impl Staging {
    /// Directory the stage writes its artifacts into.
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Published stagings were renamed away; anything left is a failure.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An exclusive claim on computing one node, across processes.
pub struct NodeLock {
    _file: File,
}

/// A shared claim on the cache held by runs; `gc` takes it exclusively.
pub struct CacheLock {
    _file: File,
}

fn shard(id: &Hash) -> (String, String) {
    let hex = id.hex();
    (hex[..2].to_string(), hex)
}

impl Store {
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for sub in ["nodes", "tmp", "locks", "quarantine", "runs", "hashes"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store {
            hashes: hashing::Memo::new(root.join("hashes")),
            root,
            verified: Mutex::new(HashSet::new()),
            counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn node_dir(&self, id: &Hash) -> PathBuf {
        let (s, hex) = shard(id);
        self.root.join("nodes").join(s).join(hex)
    }

    /// Directory of a finished node's artifacts.
    pub fn out_dir(&self, id: &Hash) -> PathBuf {
        self.node_dir(id).join("out")
    }

    pub fn is_cached(&self, id: &Hash) -> bool {
        self.node_dir(id).join("manifest.json").is_file()
    }

    /// Every finished node id (a directory holding a manifest), from one
    /// listing per shard in parallel. Links in place of shards or nodes are
    /// not followed.
    pub fn cached_ids(&self) -> Result<HashSet<Hash>> {
        use rayon::prelude::*;
        let nodes = self.root.join("nodes");
        let shards: Vec<PathBuf> = fs::read_dir(&nodes)
            .map_err(io_err(&nodes))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        let sets: Vec<Vec<Hash>> = shards
            .par_iter()
            .map(|dir| {
                let mut ids = Vec::new();
                for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
                    let Some(id) = entry.file_name().to_str().and_then(Hash::from_hex) else {
                        continue;
                    };
                    let manifest = entry.path().join("manifest.json");
                    if entry.file_type().is_ok_and(|t| t.is_dir())
                        && fs::symlink_metadata(&manifest).is_ok_and(|m| m.is_file())
                    {
                        ids.push(id);
                    }
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        Ok(sets.into_iter().flatten().collect())
    }

    /// The node's manifest, checked against the sha256 it records.
    pub fn read_manifest(&self, id: &Hash) -> Result<NodeManifest> {
        let path = self.node_dir(id).join("manifest.json");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        manifest::unseal(&bytes).map_err(|e| match e {
            manifest::Unsealed::Invalid(source) => StoreError::Manifest { path, source },
            e => StoreError::Corrupted {
                id: id.hex(),
                problem: format!("{}: {e}", path.display()),
            },
        })
    }

    /// Start computing `id` in a fresh temporary directory.
    pub fn stage(&self, id: &Hash) -> Result<Staging> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{}.{}.{n}", id.hex(), std::process::id()));
        let out = dir.join("out");
        fs::create_dir_all(&out).map_err(io_err(&out))?;
        Ok(Staging { id: *id, dir })
    }

    /// Hash every artifact, write the manifest, fsync, and atomically rename
    /// the staging directory into place. `declared` outputs must exist.
    pub fn publish(
        &self,
        staging: Staging,
        mut manifest: NodeManifest,
        declared: &[String],
    ) -> Result<NodeManifest> {
        let out = staging.out();
        for name in declared {
            if !out.join(name).exists() {
                return Err(StoreError::MissingOutput { name: name.clone() });
            }
        }
        manifest.artifacts = manifest::hash_tree(&out)?;
        let manifest_path = staging.dir.join("manifest.json");
        write_synced(&manifest_path, &manifest::seal(&manifest))?;
        sync_dir(&out)?;
        sync_dir(&staging.dir)?;
        let dest = self.node_dir(&staging.id);
        let parent = dest.parent().expect("node dirs have a shard parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        match fs::rename(&staging.dir, &dest) {
            Ok(()) => {}
            // Another process published the same node first: same content by
            // construction, so keep theirs.
            Err(_) if self.is_cached(&staging.id) => return self.read_manifest(&staging.id),
            Err(e) => return Err(io_err(&dest)(e)),
        }
        sync_dir(parent)?;
        self.verified
            .lock()
            .expect("verified set lock")
            .insert(staging.id);
        Ok(manifest)
    }

    /// Check every artifact against the manifest (once per process per node).
    pub fn verify(&self, id: &Hash) -> Result<NodeManifest> {
        let manifest = self.read_manifest(id).map_err(|e| match e {
            StoreError::Corrupted { .. } => e,
            e => StoreError::Corrupted {
                id: id.hex(),
                problem: e.to_string(),
            },
        })?;
        if self
            .verified
            .lock()
            .expect("verified set lock")
            .contains(id)
        {
            return Ok(manifest);
        }
        let out = self.out_dir(id);
        for (name, art) in &manifest.artifacts {
            if manifest.pruned.contains(name) {
                continue;
            }
            let path = out.join(name);
            let corrupted = |problem: String| StoreError::Corrupted {
                id: id.hex(),
                problem: format!("{}: {problem}", path.display()),
            };
            let meta = fs::metadata(&path).map_err(|e| corrupted(e.to_string()))?;
            if meta.len() != art.size {
                return Err(corrupted(format!(
                    "size {} but the manifest says {}",
                    meta.len(),
                    art.size
                )));
            }
            let actual = hash_file(&path).map_err(|e| corrupted(e.to_string()))?;
            if actual.hex() != art.sha256 {
                return Err(corrupted("content does not match its sha256".into()));
            }
        }
        self.verified.lock().expect("verified set lock").insert(*id);
        Ok(manifest)
    }

    /// Move a corrupted entry aside (kept for inspection, never used again):
    /// where it went, or `None` when there was nothing to move.
    pub fn quarantine(&self, id: &Hash) -> Result<Option<PathBuf>> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dest = self
            .root
            .join("quarantine")
            .join(format!("{}.{stamp}", id.hex()));
        let moved = self.move_entry(id, &dest)?;
        Ok(moved.then_some(dest))
    }

    /// Delete a sound entry so that it is computed again (a dependent needs
    /// an artifact the materialisation policy pruned). False when absent.
    pub fn remove_entry(&self, id: &Hash) -> Result<bool> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dest =
            self.root
                .join("tmp")
                .join(format!("{}.removed.{}.{n}", id.hex(), std::process::id()));
        // Out of nodes/ in one rename, so readers never see half of it.
        if !self.move_entry(id, &dest)? {
            return Ok(false);
        }
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
        Ok(true)
    }

    fn move_entry(&self, id: &Hash, dest: &Path) -> Result<bool> {
        let src = self.node_dir(id);
        self.verified.lock().expect("verified set lock").remove(id);
        match fs::rename(&src, dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&src)(e)),
        }
    }

    /// Delete a large artifact the materialisation policy does not keep; the
    /// node stays cached (its manifest records the artifact as pruned).
    pub fn prune(&self, id: &Hash, names: &[String]) -> Result<()> {
        let mut manifest = self.read_manifest(id)?;
        let out = self.out_dir(id);
        for name in names {
            if manifest.artifacts.contains_key(name) && !manifest.pruned.contains(name) {
                manifest.pruned.push(name.clone());
            }
        }
        // Manifest first: a crash in between leaves a file the manifest
        // already calls pruned, never a missing file it calls present.
        let path = self.node_dir(id).join("manifest.json");
        write_atomic(&path, &manifest::seal(&manifest))?;
        for name in names {
            let p = out.join(name);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }

    /// Block until this process may compute `id`.
    pub fn lock_node(&self, id: &Hash) -> Result<NodeLock> {
        let (s, hex) = shard(id);
        let dir = self.root.join("locks").join(s);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{hex}.lock"));
        let file = File::create(&path).map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(NodeLock { _file: file })
    }

    /// Shared lock for runs; [`Store::lock_exclusive`] for gc.
    pub fn lock_shared(&self) -> Result<CacheLock> {
        let file = self.cache_lock_file()?;
        file.lock_shared().map_err(io_err(&self.root))?;
        Ok(CacheLock { _file: file })
    }

    /// Exclusive lock, or `None` while runs hold the cache.
    pub fn try_lock_exclusive(&self) -> Result<Option<CacheLock>> {
        let file = self.cache_lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(CacheLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&self.root)(e)),
        }
    }

    fn cache_lock_file(&self) -> Result<File> {
        let path = self.root.join(".lock");
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// Content hash of a file or directory, remembered by path, size, mtime,
    /// ctime and inode so big inputs are read once.
    pub fn content_hash(&self, path: &Path) -> io::Result<Hash> {
        self.hashes.hash(path)
    }

    pub fn run_record_path(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(format!("{run_id}.json"))
    }

    pub fn write_run_record(&self, run_id: &str, record: &RunRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
        write_atomic(&self.run_record_path(run_id), &bytes)
    }

    pub fn read_run_record(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let path = self.run_record_path(run_id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Record { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Node ids and run record ids in the cache whose hex starts with `prefix`.
    pub fn find(&self, prefix: &str) -> Result<(Vec<Hash>, Vec<String>)> {
        let prefix = prefix.to_ascii_lowercase();
        let mut nodes = Vec::new();
        if prefix.len() >= 2 {
            let dir = self.root.join("nodes").join(&prefix[..2]);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(&prefix) {
                        nodes.extend(Hash::from_hex(&name));
                    }
                }
            }
        }
        let mut runs = Vec::new();
        let dir = self.root.join("runs");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if id.starts_with(&prefix) {
                    runs.push(id.to_string());
                }
            }
        }
        Ok((nodes, runs))
    }

    /// Garbage collection: node directories not in `keep` (finished or
    /// without a manifest), leftovers of killed processes, and symbolic
    /// links where the cache keeps shards, nodes or temporaries. Never
    /// follows a link: a link is removed, not what it points to. Deletes
    /// only with `delete`; needs no run active.
    pub fn gc(&self, keep: &HashSet<Hash>, delete: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let nodes = self.root.join("nodes");
        for shard in fs::read_dir(&nodes).map_err(io_err(&nodes))?.flatten() {
            let shard_path = shard.path();
            if is_link(&shard) {
                report.remove_link(&shard_path, delete)?;
                continue;
            }
            if !shard.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for entry in fs::read_dir(&shard_path)
                .map_err(io_err(&shard_path))?
                .flatten()
            {
                let Some(id) = entry.file_name().to_str().and_then(Hash::from_hex) else {
                    continue;
                };
                let path = entry.path();
                if is_link(&entry) {
                    report.remove_link(&path, delete)?;
                } else if entry.file_type().is_ok_and(|t| t.is_dir()) && !keep.contains(&id) {
                    report.bytes += dir_size(&path);
                    report.nodes.push(id);
                    if delete {
                        fs::remove_dir_all(&path).map_err(io_err(&path))?;
                    }
                }
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let path = e.path();
            if is_link(&e) {
                report.remove_link(&path, delete)?;
                continue;
            }
            report.bytes += dir_size(&path);
            report.temporaries += 1;
            if delete {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            }
        }
        report.nodes.sort();
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub nodes: Vec<Hash>,
    /// Leftover temporary directories of killed processes.
    pub temporaries: usize,
    /// Symbolic links found in the cache's layout (removed, never followed).
    pub links: Vec<PathBuf>,
    pub bytes: u64,
}

impl GcReport {
    fn remove_link(&mut self, link: &Path, delete: bool) -> Result<()> {
        self.links.push(link.to_path_buf());
        if delete {
            fs::remove_file(link).map_err(io_err(link))?;
        }
        Ok(())
    }
}

fn is_link(entry: &fs::DirEntry) -> bool {
    entry.file_type().is_ok_and(|t| t.is_symlink())
}

/// Bytes in regular files under `dir`, not following links (`dir` itself
/// included).
fn dir_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .follow_root_links(false)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Write through a temporary file and rename, so readers never see a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}
