//! Every `${…}` a command stage receives arrives as exactly one shell word
//! (or as exactly its text inside the user's own quotes), whatever it
//! contains; paths are absolute; nothing is substituted twice.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::Workspace;

/// The contents of every file called `name` among the cached nodes.
fn outputs(cache: &Path, name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for shard in std::fs::read_dir(cache.join("nodes")).unwrap().flatten() {
        for node in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let p = node.path().join("out").join(name);
            if let Ok(text) = std::fs::read_to_string(&p) {
                found.insert(text);
            }
        }
    }
    found
}

/// Files a command should never have created in the workspace.
fn assert_no_stray_files(ws: &Workspace, allowed: &[&str]) {
    let names: Vec<String> = std::fs::read_dir(ws.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    assert!(
        names.is_empty(),
        "commands wrote {names:?} into the workspace"
    );
}

fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// A grid of hostile values, each written back by the command.
const HOSTILE: &str = r#"
commands:
  echo:
    run: printf %s ${v} > ${out}/v.txt
    outputs: [v.txt]
grid:
  v: ["$(touch X)", "x; touch X", "`touch X`", "it's", "${out}", "a  b", "*", "-n", ""]
"#;

const HOSTILE_VALUES: &[&str] = &[
    "$(touch X)",
    "x; touch X",
    "`touch X`",
    "it's",
    "${out}",
    "a  b",
    "*",
    "-n",
    "",
];

#[test]
fn grid_values_are_never_code_and_never_split() {
    let ws = Workspace::new();
    ws.write("exp.yaml", HOSTILE);
    ws.ok(&["run", "exp.yaml"]);
    assert_eq!(outputs(&ws.cache(), "v.txt"), set(HOSTILE_VALUES));
    assert_no_stray_files(&ws, &["exp.yaml", "cache"]);
}

#[test]
fn a_value_written_as_a_reference_stays_literal() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        "commands:\n  echo:\n    run: echo ${v} ${step} > ${out}/v.txt\n    outputs: [v.txt]\ngrid:\n  v: [\"${out}\", \"${step}x\"]\n",
    );
    ws.ok(&["run", "exp.yaml"]);
    assert_eq!(
        outputs(&ws.cache(), "v.txt"),
        set(&["${out} 0\n", "${step}x 0\n"])
    );
}

#[test]
fn values_inside_the_users_quotes_are_their_text() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        r#"
commands:
  quoted:
    run: |
      printf '%s|' "${v}" "pre ${v} post" 'single ${v}' > ${out}/v.txt
      cat > ${out}/doc.txt <<EOF
      ${v}
      EOF
    outputs: [v.txt]
grid:
  v: ["it's", "say \"hi\"", "$(touch X)", "back\\slash", "a  b"]
"#,
    );
    ws.ok(&["run", "exp.yaml"]);
    let values = ["it's", "say \"hi\"", "$(touch X)", "back\\slash", "a  b"];
    let want: BTreeSet<String> = values
        .iter()
        .map(|v| format!("{v}|pre {v} post|single {v}|"))
        .collect();
    assert_eq!(outputs(&ws.cache(), "v.txt"), want);
    let docs: BTreeSet<String> = values.iter().map(|v| format!("{v}\n")).collect();
    assert_eq!(outputs(&ws.cache(), "doc.txt"), docs);
    assert_no_stray_files(&ws, &["exp.yaml", "cache"]);
}

#[test]
fn a_cache_path_with_a_space_is_one_word() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        "commands:\n  first:\n    run: echo hi > ${out}/a.txt\n    outputs: [a.txt]\n  second:\n    run: cat ${first}/a.txt > ${out}/b.txt\n    needs: [first]\n    outputs: [b.txt]\n",
    );
    let cache = ws.path("dir with space");
    let out = ws
        .spur()
        .env("SPUR_CACHE", &cache)
        .args(["run", "exp.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(outputs(&cache, "b.txt"), set(&["hi\n"]));
    assert_no_stray_files(&ws, &["exp.yaml", "dir with space"]);
}

#[test]
fn an_input_path_with_a_space_is_one_word() {
    let ws = Workspace::new();
    ws.write("my data.txt", "payload\n");
    ws.write(
        "exp.yaml",
        "commands:\n  copy:\n    run: cat ${inputs.data} > ${out}/copy.txt\n    inputs: {data: my data.txt}\n    outputs: [copy.txt]\n",
    );
    ws.ok(&["run", "exp.yaml"]);
    assert_eq!(outputs(&ws.cache(), "copy.txt"), set(&["payload\n"]));
}

#[test]
fn paths_are_absolute_with_a_relative_cache() {
    let ws = Workspace::new();
    ws.write("script.sh", "echo from-script\n");
    ws.write(
        "exp.yaml",
        r#"
commands:
  first:
    run: cd / && echo hi > ${out}/a.txt
    outputs: [a.txt]
  train:
    run: |
      cd /
      if [ -n ${prev} ]; then cat ${prev}/w.txt > ${out}/w.txt; fi
      cat ${first}/a.txt >> ${out}/w.txt
      bash ${inputs.script} >> ${out}/w.txt
      [ "$SPUR_OUT" = ${out} ]
    inputs: {script: script.sh}
    needs: [first]
    per_step: true
    outputs: [w.txt]
defaults:
  steps: 2
"#,
    );
    // The default cache is ./cache: relative.
    let out = ws
        .spur()
        .env_remove("SPUR_CACHE")
        .args(["run", "exp.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = outputs(&ws.cache(), "w.txt");
    assert!(
        w.contains("hi\nfrom-script\nhi\nfrom-script\n"),
        "step 2 extends step 1: {w:?}"
    );
}
