//! Writing a report directory whole: files go into a temporary directory
//! beside the destination, which then replaces it by rename.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{io_err, ReportError, Result};

/// Marks a directory as a spur report, which a later report may replace.
pub const MARKER_FILE: &str = ".spur-report";

/// Write `rel` (which may contain `/`) under `dir`, flushed to disk.
pub fn write_file(dir: &Path, rel: &str, bytes: &[u8]) -> Result<String> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut f = fs::File::create(&path).map_err(io_err(&path))?;
    f.write_all(bytes).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))?;
    Ok(rel.to_string())
}

/// Build a new directory with `fill`, then put it at `dir`. An existing
/// `dir` must be empty or an earlier report; it is replaced only once the
/// new one is complete.
pub fn replace_dir<T>(dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let dir = if dir.exists() {
        fs::canonicalize(dir).map_err(io_err(dir))?
    } else {
        dir.to_path_buf()
    };
    let existing = dir.exists();
    if existing && !is_replaceable(&dir)? {
        return Err(ReportError::NotAReport { path: dir });
    }
    let (parent, name) = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(n)) => (p, n.to_string_lossy().into_owned()),
        _ => {
            return Err(ReportError::Io {
                path: dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a directory name a report can be written to",
                ),
            })
        }
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = sibling(parent, &name, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = fill(&tmp).and_then(|t| {
        write_file(&tmp, MARKER_FILE, b"written by `spur report`\n")?;
        Ok(t)
    });
    let value = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if existing {
        // Two renames: there is no atomic swap of non-empty directories.
        let old = sibling(parent, &name, "old");
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        fs::rename(&dir, &old).map_err(io_err(&dir))?;
        fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    }
    Ok(value)
}

fn sibling(parent: &Path, name: &str, what: &str) -> PathBuf {
    parent.join(format!(".{name}.{what}-{}", std::process::id()))
}

fn is_replaceable(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    if dir.join(MARKER_FILE).is_file() {
        return Ok(true);
    }
    let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
    Ok(entries.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_report_replaces_an_old_one_whole() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("reports/demo");
        replace_dir(&dir, |tmp| write_file(tmp, "a/old.txt", b"old")).unwrap();
        replace_dir(&dir, |tmp| write_file(tmp, "new.txt", b"new")).unwrap();
        assert!(!dir.join("a/old.txt").exists());
        assert_eq!(fs::read(dir.join("new.txt")).unwrap(), b"new");
        assert!(dir.join(MARKER_FILE).is_file());
        // Nothing left beside it.
        let names: Vec<_> = fs::read_dir(t.path().join("reports")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_failed_report_leaves_the_old_one() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r");
        replace_dir(&dir, |tmp| write_file(tmp, "x", b"1")).unwrap();
        let err = replace_dir(&dir, |tmp| {
            write_file(tmp, "x", b"2")?;
            Err::<(), _>(ReportError::Plot {
                file: "p".into(),
                problem: "boom".into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(fs::read(dir.join("x")).unwrap(), b"1");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn other_directories_are_refused() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("precious.txt"), b"keep").unwrap();
        let err = replace_dir(t.path(), |tmp| write_file(tmp, "x", b"1")).unwrap_err();
        assert!(matches!(err, ReportError::NotAReport { .. }), "{err}");
        assert!(err.to_string().contains("choose another --out"));
        assert!(t.path().join("precious.txt").is_file());
    }
}
