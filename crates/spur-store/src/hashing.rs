//! Content hashes of external inputs, remembered across runs.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spur_core::Hash;

pub fn hash_reader(mut r: impl Read) -> io::Result<Hash> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Hash(h.finalize().into()))
}

pub fn hash_file(path: &Path) -> io::Result<Hash> {
    hash_reader(fs::File::open(path)?)
}

/// What identifies a file's content without reading it. The mtime can be
/// set back (`touch -r`) after a rewrite; the ctime cannot, so a rewrite
/// always changes the stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    dev: u64,
}

/// File systems stamp times with a coarse clock (a kernel tick, or a second
/// or two on some), so a rewrite this soon after the last change can carry
/// the same ctime; a hash taken that soon is not trusted later.
const RACY_NS: i128 = 2_000_000_000;

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            inode: meta.ino(),
            dev: meta.dev(),
        }
    }

    /// Whether a hash taken at `hashed_at_ns` of a file stamped `self` still
    /// holds for a file now stamped `now`.
    fn vouches_for(&self, hashed_at_ns: i128, now: &Stamp) -> bool {
        self == now && self.ctime_ns + RACY_NS < hashed_at_ns
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[derive(Serialize, Deserialize)]
struct Remembered {
    path: PathBuf,
    stamp: Stamp,
    /// When the file was read (wall clock, ns since the epoch).
    hashed_at_ns: i128,
    sha256: String,
}

/// Hashes by (path, size, mtime, ctime, inode): in memory, and one small file
/// per path on disk so later processes skip re-reading multi-GB weights.
pub(crate) struct Memo {
    dir: PathBuf,
    mem: Mutex<HashMap<PathBuf, (Stamp, i128, Hash)>>,
}

impl Memo {
    pub fn new(dir: PathBuf) -> Memo {
        Memo {
            dir,
            mem: Mutex::new(HashMap::new()),
        }
    }

    /// A file's sha256, or for a directory sha256 over its sorted
    /// `relative path \0 file sha256 \n` lines.
    pub fn hash(&self, path: &Path) -> io::Result<Hash> {
        let path = fs::canonicalize(path)?;
        let meta = fs::metadata(&path)?;
        if meta.is_dir() {
            let mut lines = Vec::new();
            for entry in walkdir::WalkDir::new(&path).sort_by_file_name() {
                let entry = entry.map_err(io::Error::other)?;
                if entry.file_type().is_file() {
                    let rel = entry.path().strip_prefix(&path).expect("walk stays inside");
                    let h =
                        self.file(entry.path(), &entry.metadata().map_err(io::Error::other)?)?;
                    lines.push(format!("{}\0{}\n", rel.display(), h.hex()));
                }
            }
            return Ok(Hash(Sha256::digest(lines.concat().as_bytes()).into()));
        }
        self.file(&path, &meta)
    }

    fn file(&self, path: &Path, meta: &fs::Metadata) -> io::Result<Hash> {
        let stamp = Stamp::of(meta);
        if let Some((s, at, h)) = self.mem.lock().expect("memo lock").get(path) {
            if s.vouches_for(*at, &stamp) {
                return Ok(*h);
            }
        }
        let memo_file = self.dir.join(format!(
            "{}.json",
            hex::encode(Sha256::digest(path.as_os_str().as_encoded_bytes()))
        ));
        let remembered = fs::read(&memo_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Remembered>(&b).ok())
            .filter(|r| r.path == path && r.stamp.vouches_for(r.hashed_at_ns, &stamp))
            .and_then(|r| Some((r.hashed_at_ns, Hash::from_hex(&r.sha256)?)));
        let (hashed_at_ns, hash) = match remembered {
            Some(r) => r,
            None => {
                let at = now_ns();
                let h = hash_file(path)?;
                let record = Remembered {
                    path: path.to_path_buf(),
                    stamp: stamp.clone(),
                    hashed_at_ns: at,
                    sha256: h.hex(),
                };
                // Best effort: a memo that cannot be written only costs a re-hash.
                let _ = crate::write_atomic(
                    &memo_file,
                    &serde_json::to_vec(&record).expect("memo serialises"),
                );
                (at, h)
            }
        };
        self.mem
            .lock()
            .expect("memo lock")
            .insert(path.to_path_buf(), (stamp, hashed_at_ns, hash));
        Ok(hash)
    }
}
