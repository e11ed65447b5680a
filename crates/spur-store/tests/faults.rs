//! Damaged or tampered caches: what the store notices and what it refuses to do.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use spur_core::Hash;
use spur_store::{NodeManifest, Store, StoreError};

fn id(n: u8) -> Hash {
    Hash([n; 32])
}

/// Publish node `id` with one artifact and the given metrics.
fn publish(store: &Store, id: Hash, metrics: serde_json::Value) {
    let staging = store.stage(&id).unwrap();
    fs::write(staging.out().join("w.txt"), "weights").unwrap();
    let manifest = NodeManifest {
        id: id.hex(),
        kind: "command".into(),
        metrics,
        ..Default::default()
    };
    store.publish(staging, manifest, &[]).unwrap();
}

fn manifest_path(store: &Store, id: &Hash) -> std::path::PathBuf {
    store.node_dir(id).join("manifest.json")
}

#[test]
fn rewrite_with_restored_mtime_is_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    let input = dir.path().join("train.jsonl");
    fs::write(&input, "old content\n").unwrap();
    let mtime = fs::metadata(&input).unwrap().modified().unwrap();
    let old = store.content_hash(&input).unwrap();

    // Same size, same inode, mtime set back as `touch -r` would.
    fs::write(&input, "new content\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&input)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(&input).unwrap().modified().unwrap(), mtime);
    let expected = spur_store::hash_file(&input).unwrap();
    assert_ne!(expected, old);
    assert_eq!(
        store.content_hash(&input).unwrap(),
        expected,
        "in-process memo"
    );
    // A later process, reading the memo on disk.
    let later = Store::open(dir.path().join("cache")).unwrap();
    assert_eq!(
        later.content_hash(&input).unwrap(),
        expected,
        "memo on disk"
    );
}

#[test]
fn node_directory_without_manifest_is_absent_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (id(0xab), id(0xac));
    publish(&store, a, serde_json::json!({}));
    publish(&store, b, serde_json::json!({}));
    fs::remove_file(manifest_path(&store, &a)).unwrap();

    assert!(!store.is_cached(&a));
    assert_eq!(store.cached_ids().unwrap(), HashSet::from([b]));
    let moved = store
        .quarantine(&a)
        .unwrap()
        .expect("the directory is moved");
    assert!(moved.starts_with(dir.path().join("quarantine")));
    assert!(moved.join("out/w.txt").is_file(), "kept for inspection");
    assert!(!store.node_dir(&a).exists());
    assert_eq!(store.quarantine(&a).unwrap(), None, "nothing left to move");
    // The node can be published again.
    publish(&store, a, serde_json::json!({}));
    assert!(store.verify(&a).is_ok());
}

#[test]
fn edited_manifest_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = id(0x12);
    // Floats that do not round-trip naively still read back intact.
    publish(
        &store,
        a,
        serde_json::json!({"loss": 0.1 + 0.2, "accuracy": 0.5}),
    );
    assert_eq!(store.read_manifest(&a).unwrap().metrics["accuracy"], 0.5);

    let path = manifest_path(&store, &a);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("\"accuracy\": 0.5", "\"accuracy\": 0.9"),
    )
    .unwrap();
    for err in [
        store.read_manifest(&a).unwrap_err(),
        Store::open(dir.path()).unwrap().verify(&a).unwrap_err(),
    ] {
        assert!(
            matches!(&err, StoreError::Corrupted { .. })
                && err.to_string().contains("changed after spur wrote it"),
            "{err}"
        );
    }

    // Without its sha256 (a manifest spur never wrote, or one stripped of it).
    let stripped: String = text
        .lines()
        .filter(|l| !l.contains("manifest_sha256"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\"spur_version\": \"\",", "\"spur_version\": \"\"");
    fs::write(&path, stripped).unwrap();
    let err = store.read_manifest(&a).unwrap_err();
    assert!(err.to_string().contains("records no sha256"), "{err}");
}

#[test]
fn pruning_keeps_the_manifest_sound() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = id(0x34);
    publish(&store, a, serde_json::json!({"loss": 1.5}));
    store.prune(&a, &["w.txt".to_string()]).unwrap();
    let manifest = Store::open(dir.path()).unwrap().verify(&a).unwrap();
    assert_eq!(manifest.pruned, ["w.txt"]);
}

fn symlink(target: &Path, link: &Path) {
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[test]
fn gc_removes_links_never_their_targets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    let nodes = dir.path().join("cache/nodes");
    // Outside the cache, shaped like cache contents so a walk would match.
    let outside = dir.path().join("elsewhere");
    let victim = id(0xbb).hex();
    fs::create_dir_all(outside.join(&victim)).unwrap();
    fs::write(outside.join(&victim).join("manifest.json"), "{}").unwrap();
    fs::write(outside.join("precious.txt"), "keep me").unwrap();
    symlink(&outside, &nodes.join("bb"));
    let linked_node = id(0xcc).hex();
    symlink(&outside, &nodes.join("cc").join(&linked_node));
    symlink(&outside, &dir.path().join("cache/tmp/leftover"));
    // A real unreferenced node beside them.
    let real = id(0xdd);
    publish(&store, real, serde_json::json!({}));

    let dry = store.gc(&HashSet::new(), false).unwrap();
    assert_eq!(dry.nodes, [real]);
    assert_eq!(dry.links.len(), 3);
    assert_eq!(dry.temporaries, 0);

    store.gc(&HashSet::new(), true).unwrap();
    assert_eq!(
        fs::read_to_string(outside.join("precious.txt")).unwrap(),
        "keep me"
    );
    assert!(outside.join(&victim).join("manifest.json").is_file());
    for link in [
        nodes.join("bb"),
        nodes.join("cc").join(&linked_node),
        dir.path().join("cache/tmp/leftover"),
    ] {
        assert!(fs::symlink_metadata(&link).is_err(), "{}", link.display());
    }
    assert!(!store.node_dir(&real).exists());
}
