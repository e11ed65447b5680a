//! With HF_HUB_OFFLINE set and an empty cache, a hub id fails naming the missing file.
//! Its own test binary because it sets process environment variables.

#[test]
fn offline_hub_id_names_missing_file() {
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = spur_lm::resolve("Qwen/Qwen2.5-Math-1.5B", home.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, spur_lm::Error::OfflineMissing { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("config.json") && msg.contains("Qwen/Qwen2.5-Math-1.5B"),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
}
