//! `index.html` in a real browser: headless Chromium driven by chromedriver
//! over the W3C WebDriver protocol (plain HTTP/1.1 on a local port, spoken
//! here with std). Checks that the table and every plot render, that text
//! from the experiment and from model output stays text, and writes a
//! screenshot.
//!
//! Needs Debian's `chromium` and `chromium-driver`; without them the test
//! says so and passes, unless SPUR_BROWSER_REQUIRED=1 (CI sets it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spur_report::{ExperimentInfo, RecordFile, ReportInput, RunInput, Sample};

const PAYLOAD: &str = "<script>window.__xss=1</script>";
const IMG_PAYLOAD: &str = "<img src=x onerror=\"window.__xss=2\">";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A run record in `spur run`'s format (spur_store::RunRecord): MATH-500 evals at
/// steps 0 and 2, two GRPO steps; nodes after `done_through` are pending.
fn record(reward: &str, seed: u64, done_through: u32) -> Value {
    let mut nodes = Vec::new();
    let mut push = |id: String, kind: &str, step: u32, metrics: Value| {
        let done = step <= done_through;
        nodes.push(json!({
            "id": id, "kind": kind, "step": step, "shared": step == 0,
            "status": if done { "cached" } else { "pending" },
            "seconds": if done { json!(2.0) } else { Value::Null },
            "finished_at": if done { json!("2025-01-01T00:00:00Z") } else { Value::Null },
            "metrics": if done { metrics } else { Value::Null },
        }));
    };
    let eval = |step: u32| {
        let acc = 0.25 + 0.05 * f64::from(step) * if reward == "random" { 0.5 } else { 1.0 };
        let group =
            |correct: u64| json!({"n": 8, "correct": correct, "accuracy": correct as f64 / 8.0});
        json!({"accuracy": acc, "overall": {"n": 8, "correct": 2, "accuracy": acc},
               "code_frequency": 0.125 * f64::from(step), "boxed_rate": 0.5, "mean_length": 60.0,
               "grader": "paper",
               "graders": {"n": 8, "by_grader": {"paper": group(2), "strict": group(3), "math_verify": group(3 + u64::from(step))},
                           "pairs": [], "disagree": 1 + step, "disagree_lines": [1]}})
    };
    push("e0".into(), "eval", 0, eval(0));
    for step in 1..=2u32 {
        let tag = format!("{reward}-{seed}-{step}");
        push(format!("r{tag}"), "rollout", step, json!({}));
        push(format!("w{tag}"), "reward", step, json!({}));
        push(
            format!("u{tag}"),
            "update",
            step,
            json!({"clip_fraction_low": 0.01 * f64::from(step), "clip_fraction_high": 0.02,
                   "reward_mean": 0.5, "response_length": 60.0, "code_reasoning": 0.1}),
        );
    }
    push(format!("e{reward}-{seed}-2"), "eval", 2, eval(2));
    let done = nodes.iter().filter(|n| n["status"] == "cached").count();
    json!({
        "run_id": format!("{reward}{seed}"),
        "status": if done == nodes.len() { "finished" } else { "stopped" },
        "error": null,
        "experiment": {"path": "/x/browser.yaml", "name": "browser", "sha256": "ab"},
        "cell": {"reward": reward, "seed": seed},
        "first_started_at": "2025-01-01T00:00:00Z",
        "started_at": "2025-01-01T00:00:00Z",
        "params": {"model": "tiny", "reward": reward, "seed": seed},
        "nodes_done": done,
        "nodes_total": nodes.len(),
        "provenance": {
            "git": {"commit": "abc123", "dirty": false, "diff_sha256": null},
            "cargo_lock_sha256": "c0ffee",
            "inputs": {"datasets.math500": "35dc41"},
        },
        "nodes": nodes,
    })
}

fn input() -> ReportInput {
    let mut runs = Vec::new();
    for reward in ["ground_truth", "random"] {
        for seed in [1u64, 2] {
            // random/2 stopped after step 1: its step-2 eval is pending.
            let through = if (reward, seed) == ("random", 2) {
                1
            } else {
                2
            };
            let json = record(reward, seed, through);
            let eval_names: BTreeMap<String, String> = json["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["kind"] == "eval")
                .map(|n| (n["id"].as_str().unwrap().to_string(), "math500".to_string()))
                .collect();
            runs.push(RunInput {
                id: format!("{reward}{seed}"),
                label: format!("reward={reward},seed={seed}"),
                model: "tiny".into(),
                reward: reward.into(),
                seed: seed.to_string(),
                variant: String::new(),
                record: Some(RecordFile {
                    path: PathBuf::from(format!("runs/{reward}{seed}.json")),
                    record: serde_json::from_value(json).expect("a RunRecord"),
                }),
                eval_names,
                samples: vec![Sample {
                    eval: "math500".into(),
                    step: u64::from(through),
                    problem: "test/algebra/1.json".into(),
                    gold: "4".into(),
                    extracted: "4".into(),
                    correct: true,
                    response: format!("The answer is \\boxed{{4}}. {PAYLOAD} {IMG_PAYLOAD}"),
                }],
            });
        }
    }
    ReportInput {
        experiment: ExperimentInfo {
            name: format!("browser {PAYLOAD}"),
            path: "/tmp/browser.yaml".into(),
            sha256: "ab".repeat(32),
            description: None,
        },
        runs,
    }
}

/// One HTTP/1.1 exchange with chromedriver, which may keep the connection
/// open: the answer ends at its Content-Length (or its last chunk).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let payload = loop {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        raw.extend_from_slice(&buf[..n]);
        if let Some(payload) = complete_body(&raw)? {
            break payload;
        }
        if n == 0 {
            return Err(format!("{method} {path}: connection closed mid-answer"));
        }
    };
    let status_ok = raw.starts_with(b"HTTP/1.1 200") || raw.starts_with(b"HTTP/1.0 200");
    let value: Value = serde_json::from_slice(&payload)
        .map_err(|e| format!("{method} {path}: answer is not JSON: {e}"))?;
    if !status_ok {
        return Err(format!("{method} {path}: {}", value["value"]));
    }
    Ok(value["value"].clone())
}

/// The body of a complete HTTP answer in `raw`, or `None` if more is to come.
fn complete_body(raw: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let rest = &raw[split + 4..];
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if header("transfer-encoding:").is_some_and(|v| v == "chunked") {
        return dechunk(rest);
    }
    let len: usize = header("content-length:")
        .ok_or("chromedriver's answer has no Content-Length")?
        .parse()
        .map_err(|_| "bad Content-Length")?;
    Ok((rest.len() >= len).then(|| rest[..len].to_vec()))
}

/// A chunked body, or `None` while its last chunk has not arrived.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&data[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        let Some(chunk) = data.get(..size) else {
            return Ok(None);
        };
        out.extend_from_slice(chunk);
        let Some(next) = data.get(size + 2..) else {
            return Ok(None);
        };
        data = next;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// chromedriver and the browser session; both end when this is dropped.
struct Driver {
    child: Child,
    port: u16,
    session: Option<String>,
}

impl Driver {
    fn start(chromedriver: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Driver {
            child,
            port,
            session: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http(port, "GET", "/status", None) {
                Ok(v) if v["ready"] == true => return driver,
                _ if Instant::now() > deadline => panic!("chromedriver not ready on port {port}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn open_session(&mut self, chromium: &Path, profile: &Path) {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,1000",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = http(self.port, "POST", "/session", Some(&caps)).expect("a browser session");
        self.session = Some(v["sessionId"].as_str().expect("sessionId").to_string());
    }

    fn call(&self, method: &str, what: &str, body: Option<&Value>) -> Value {
        let id = self.session.as_deref().expect("session open");
        http(self.port, method, &format!("/session/{id}/{what}"), body)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = http(self.port, "DELETE", &format!("/session/{id}"), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn index_html_renders_in_chromium() {
    let required = std::env::var("SPUR_BROWSER_REQUIRED").is_ok_and(|v| v == "1");
    let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"]);
    let chromedriver = find_program(&["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        assert!(
            !required,
            "SPUR_BROWSER_REQUIRED=1 but chromium/chromedriver are not on PATH \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: chromium or chromedriver not found (apt-get install chromium chromium-driver)");
        return;
    };

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("report");
    let written = spur_report::write_report(&input(), &dir).unwrap();
    let plots = written
        .files
        .iter()
        .filter(|f| f.starts_with("plots/") && f.ends_with(".png"))
        .count();
    // tiny: math500 accuracy, code frequency, clip fraction high and low.
    assert_eq!(plots, 4, "{:?}", written.files);

    let mut driver = Driver::start(&chromedriver);
    driver.open_session(&chromium, &tmp.path().join("profile"));
    let url = format!("file://{}", dir.join("index.html").display());
    driver.call("POST", "url", Some(&json!({"url": url})));
    let script = r#"
        document.querySelectorAll('details').forEach(d => d.open = true);
        const imgs = Array.from(document.querySelectorAll('img'));
        return {
            rows: document.querySelectorAll('#results tbody tr').length,
            grader_rows: document.querySelectorAll('#graders tbody tr').length,
            grader_header: Array.from(document.querySelectorAll('#graders th')).map(h => h.textContent),
            partial: document.querySelectorAll('#results tbody tr.partial').length,
            imgs: imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
            scripts: document.scripts.length,
            xss: typeof window.__xss,
            text: document.body.textContent,
            title: document.title,
            unfinished: document.querySelectorAll('#runs .state.unfinished').length,
        };"#;
    let page = driver.call(
        "POST",
        "execute/sync",
        Some(&json!({"script": script, "args": []})),
    );

    assert_eq!(page["rows"], 2, "one row per reward: {page}");
    assert_eq!(page["grader_rows"], 2, "the by-grader table too: {page}");
    assert_eq!(
        page["grader_header"],
        json!([
            "model",
            "reward",
            "eval",
            "paper: final (Δ)",
            "strict: final (Δ)",
            "math_verify: final (Δ)",
            "disagree"
        ])
    );
    assert_eq!(page["partial"], 1, "random has an unfinished seed");
    assert_eq!(page["unfinished"], 1);
    let imgs = page["imgs"].as_array().unwrap();
    assert_eq!(
        imgs.len(),
        plots,
        "every plot is on the page, and only they"
    );
    for img in imgs {
        assert_eq!(img[0], true, "image not loaded: {img}");
        assert!(
            img[1].as_u64().unwrap() > 0 && img[2].as_u64().unwrap() > 0,
            "{img}"
        );
    }
    assert_eq!(
        page["scripts"], 0,
        "no <script> element made it into the page"
    );
    assert_eq!(page["xss"], "undefined", "a payload ran");
    let text = page["text"].as_str().unwrap();
    assert!(text.contains(PAYLOAD), "the payload shows as text");
    assert!(text.contains(IMG_PAYLOAD), "the payload shows as text");
    assert_eq!(page["title"], format!("browser {PAYLOAD}: spur report"));

    let shot = driver.call("GET", "screenshot", None);
    let png = base64_decode(shot.as_str().expect("base64 screenshot"));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width > 0 && height > 0);
    let shot_path = tmp.path().join("screenshot.png");
    std::fs::write(&shot_path, &png).unwrap();
    assert!(std::fs::metadata(&shot_path).unwrap().len() > 1000);
    if let Some(keep) = std::env::var_os("SPUR_REPORT_SCREENSHOT") {
        std::fs::copy(&shot_path, keep).unwrap();
    }
}
