//! `dynamo bench` against the whole local graph in one process (real sidecars with the mocker
//! engine behind a real frontend, on ephemeral ports), replaying a small Mooncake-style trace.

mod common;

use std::{sync::Arc, time::Duration};

use clap::Parser;
use dynamo_bench::{self as bench, BenchArgs};
use dynamo_frontend::Frontend;
use dynamo_kv::policy::{KvRouterConfig, RouterMode};
use dynamo_model::Model;
use dynamo_sidecar::Sidecar;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

async fn graph(model: &Arc<Model>, workers: usize) -> (Frontend, Vec<Sidecar>) {
    let mut sidecars = Vec::new();
    for i in 0..workers {
        sidecars.push(common::start_sidecar(model, i, 1000.0).await);
    }
    let urls = sidecars
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let config = common::frontend_config(
        urls,
        RouterMode::RoundRobin,
        KvRouterConfig::default(),
        1 << 22,
    );
    let frontend = Frontend::start(config, model.clone())
        .await
        .expect("frontend starts");
    (frontend, sidecars)
}

/// 20 lines in 4 conversations: each later turn extends its conversation's hash ids.
fn trace_text() -> String {
    let mut out = String::new();
    for i in 0..20u64 {
        let conv = i % 4;
        let turn = i / 4;
        let blocks = 2 + turn;
        let ids: Vec<String> = (0..blocks).map(|b| (conv * 100 + b).to_string()).collect();
        out.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [{}]}}\n",
            i * 20,
            blocks * 64 - 10,
            5 + i,
            ids.join(", ")
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_replays_a_trace_and_writes_its_results() {
    let model = Arc::new(Model::builtin());
    let (frontend, sidecars) = graph(&model, 2).await;
    let dir = std::env::temp_dir().join(format!(
        "dynamo-bench-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let trace = dir.join("trace.jsonl");
    std::fs::write(&trace, trace_text()).expect("trace written");

    for endpoint in ["completions", "chat"] {
        let args = Cli::parse_from([
            "bench",
            "--url",
            &format!("http://{}", frontend.addr),
            "--trace",
            trace.to_str().expect("utf-8 path"),
            "--block-tokens",
            "64",
            "--time-scale",
            "4",
            "--timeout",
            "30s",
            "--endpoint",
            endpoint,
            "--label",
            endpoint,
            "--out",
            dir.to_str().expect("utf-8 path"),
        ])
        .bench;
        let outcome = bench::run(&args, &model).await.expect("bench runs");
        let s = &outcome.report.summary;
        let failures: Vec<_> = outcome
            .report
            .records
            .iter()
            .filter_map(|r| r.error.clone())
            .collect();
        assert_eq!((s.requests, s.ok), (20, 20), "{endpoint}: {failures:?}");
        for r in &outcome.report.records {
            assert_eq!(r.completion_tokens, r.output_length, "{endpoint}");
            assert!(r.ttft_ms.is_some(), "{endpoint}: TTFT recorded");
            if endpoint == "completions" {
                assert_eq!(
                    r.prompt_tokens, r.input_length,
                    "token-id prompts are exact"
                );
            }
        }
        assert!(s.oracle_hit_rate > 0.0);
        assert!(
            s.hit_rate > 0.0,
            "{endpoint}: shared prefixes hit the cache"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&outcome.json_path).expect("json written"))
                .expect("json parses");
        assert_eq!(json["records"].as_array().map(Vec::len), Some(20));
        assert_eq!(json["summary"]["ok"], 20);
        let png = std::fs::read(&outcome.png_path).expect("png written");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        assert!(outcome.table.contains("TTFT p99 ms"));
    }

    // A later run can be compared with an earlier result file.
    let args = Cli::parse_from([
        "bench",
        "--url",
        &format!("http://{}", frontend.addr),
        "--synthetic",
        "--requests",
        "6",
        "--rate",
        "50",
        "--isl",
        "40",
        "--osl",
        "4",
        "--turns",
        "2",
        "--block-tokens",
        "16",
        "--label",
        "synthetic",
        "--out",
        dir.to_str().expect("utf-8 path"),
        "--compare",
        dir.join("completions.json").to_str().expect("utf-8 path"),
    ])
    .bench;
    let outcome = bench::run(&args, &model)
        .await
        .expect("synthetic bench runs");
    assert_eq!(outcome.report.summary.ok, 6);
    assert!(outcome.table.contains("completions"), "{}", outcome.table);

    frontend.shutdown(Duration::ZERO).await;
    for s in sidecars {
        s.shutdown(Duration::ZERO).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bench_counts_an_unreachable_server_as_failures() {
    let model = Model::builtin();
    let dir = std::env::temp_dir().join(format!("dynamo-bench-down-{}", std::process::id()));
    let args = Cli::parse_from([
        "bench",
        "--url",
        "http://127.0.0.1:1",
        "--synthetic",
        "--requests",
        "3",
        "--rate",
        "1000",
        "--isl",
        "8",
        "--osl",
        "2",
        "--timeout",
        "5s",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ])
    .bench;
    let outcome = bench::run(&args, &model).await.expect("run ends");
    assert_eq!(outcome.report.summary.failed, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dynamo bench-transfer` moves real blocks between two processes, checks every byte, reports
/// each transport against memcpy and leaves no process or socket behind.
#[test]
fn bench_transfer_measures_tcp_and_shm_between_two_processes() {
    let dir = std::env::temp_dir().join(format!("bench-transfer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("figures.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamo"))
        .args(["bench-transfer", "--kv-geometry", "tiny", "--blocks", "8"])
        .args(["--iterations", "3", "--json"])
        .arg(&json)
        .output()
        .expect("run dynamo bench-transfer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    for transfer in ["bulk", "one block"] {
        for method in ["memcpy", "tcp", "shm"] {
            let row = rows
                .iter()
                .find(|r| r["transfer"] == transfer && r["row"]["method"] == method)
                .unwrap_or_else(|| panic!("no {transfer} {method} row in {rows:?}"));
            assert!(row["row"]["gb_per_s"].as_f64().expect("gb/s") > 0.0);
            let blocks = if transfer == "bulk" { 8 } else { 1 };
            assert_eq!(row["row"]["blocks"], blocks);
            assert_eq!(row["row"]["bytes"], blocks * 2 * 2 * 2 * 32 * 2 * 64);
        }
    }
    assert!(stdout.contains("vs memcpy"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
    // The source process is gone with the command.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "bench-transfer --source"])
        .output()
        .expect("pgrep");
    assert!(ps.stdout.is_empty(), "source process left behind");
}

/// Bad arguments are refused with the reason, before any process starts.
#[test]
fn bench_transfer_refuses_an_unknown_geometry() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamo"))
        .args(["bench-transfer", "--kv-geometry", "huge"])
        .output()
        .expect("run dynamo bench-transfer");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-geometry \"huge\""), "{err}");
}
