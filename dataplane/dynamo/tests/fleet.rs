//! A fleet that changes while it serves, as a user runs it: `dynamo serve manifests/agg.yaml` as a
//! real process tree (frontend and sidecar processes on ephemeral ports), workers killed,
//! terminated and added through `serve`'s control API while 32 streams are in flight.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A running `dynamo serve`.
struct Serve {
    child: Child,
    api: String,
    control: String,
}

impl Serve {
    fn start(extra: &[&str]) -> Serve {
        let manifest = &format!(
            "{}/../../manifests/agg.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        Serve::start_manifest(manifest, extra)
    }

    fn start_manifest(manifest: &str, extra: &[&str]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dynamo"))
            .args(["serve", manifest, "--port", "0", "--host", "127.0.0.1"])
            .args(extra)
            .env("DYN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dynamo serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut api, mut control) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("frontend on ").nth(1) {
                    api = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(rest) = line.split("control API on ").nth(1) {
                    control = rest.split_whitespace().next().map(str::to_owned);
                }
                if let (Some(a), Some(c)) = (&api, &control) {
                    let _ = tx.send((a.clone(), c.clone()));
                    api = None;
                }
                if std::env::var_os("FLEET_TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
            }
        });
        let (api, control) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("serve reports its frontend and control API");
        Serve {
            child,
            api,
            control,
        }
    }

    async fn workers(&self) -> Vec<Value> {
        let v: Value = reqwest::get(format!("{}/workers", self.control))
            .await
            .expect("control API")
            .json()
            .await
            .expect("json");
        v["workers"].as_array().cloned().unwrap_or_default()
    }

    async fn live_workers(&self) -> u64 {
        let v: Value = reqwest::get(format!("{}/health", self.api))
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
        v["live_workers"].as_u64().unwrap_or(0)
    }

    /// Waits until the frontend routes to `n` workers.
    async fn wait_live(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live_workers().await != n {
            assert!(Instant::now() < deadline, "live_workers never reached {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM lets serve stop its children; SIGKILL after a while in case it hangs.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u64, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid}");
}

/// One streamed chat completion: its text, completion tokens (from usage) and error, if any.
async fn stream(api: &str, i: u32, max_tokens: u32) -> Result<(String, u64), String> {
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": format!("Tell me story number {i}.")}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "seed": 1000 + i,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "status {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let text = r.text().await.map_err(|e| e.to_string())?;
    let (mut out, mut usage) = (String::new(), None);
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap_or(event);
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if let Some(err) = v.get("error") {
            return Err(err.to_string());
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(t);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(n);
        }
    }
    Ok((out, usage.ok_or("no usage chunk")?))
}

/// 32 concurrent 400-token streams; `disturb` runs once they are under way.
async fn streams_with<F: std::future::Future<Output = ()>>(
    api: &str,
    disturb: F,
) -> Vec<Result<(String, u64), String>> {
    let streams = futures::future::join_all((0..32).map(|i| stream(api, i, 400)));
    let (results, ()) = tokio::join!(streams, disturb);
    results
}

async fn undisturbed(api: &str) -> Vec<(String, u64)> {
    streams_with(api, async {})
        .await
        .into_iter()
        .map(|r| r.expect("undisturbed stream succeeds"))
        .collect()
}

fn pid_of(worker: &Value) -> u64 {
    worker["pid"].as_u64().expect("a running worker has a pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_stream_fails_no_stream_and_changes_no_token() {
    let serve = Serve::start(&["--router-mode", "round-robin"]);
    let baseline = undisturbed(&serve.api).await;
    assert!(baseline.iter().all(|(_, n)| *n == 400));

    let victim = pid_of(&serve.workers().await[0]);
    let results = streams_with(&serve.api, async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        signal(victim, "-9");
    })
    .await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 32 streams failed: {failed:?}",
        failed.len()
    );
    for (i, (r, b)) in results.iter().zip(&baseline).enumerate() {
        let (text, tokens) = r.as_ref().expect("checked above");
        assert_eq!(*tokens, 400, "stream {i}");
        assert_eq!(
            text, &b.0,
            "stream {i} differs from the undisturbed run with its seed"
        );
    }
    let metrics = reqwest::get(format!("{}/metrics", serve.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("dynamo_frontend_model_migration_total{model=\"tiny\",migration_type=\"ongoing_request\"}"),
        "{metrics}"
    );

    // serve restarts the dead worker as a new process, and the frontend routes to it again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let workers = serve.workers().await;
        if workers.iter().all(|w| w["state"] == "running")
            && workers.iter().any(|w| w["restarts"] == 1)
        {
            assert!(workers.iter().all(|w| w["pid"].as_u64() != Some(victim)));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker not restarted: {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serve.wait_live(2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_worker_finishes_or_hands_off_its_streams() {
    let serve = Serve::start(&["--router-mode", "round-robin"]);
    let baseline = undisturbed(&serve.api).await;
    let victim = serve.workers().await[1].clone();
    let (pid, url) = (
        pid_of(&victim),
        victim["url"].as_str().expect("url").to_owned(),
    );
    let prompt_tokens = |url: String| async move {
        let mut c = dynamo_protocol::proto::worker_client::WorkerClient::connect(url)
            .await
            .expect("connect");
        c.load(dynamo_protocol::proto::LoadRequest {})
            .await
            .expect("load")
            .into_inner()
            .prompt_tokens_total
    };
    let api = serve.api.clone();
    let results = streams_with(&serve.api, async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        signal(pid, "-TERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The worker drains its streams; meanwhile it takes nothing new.
        let before = prompt_tokens(url.clone()).await;
        let fresh: Vec<_> =
            futures::future::join_all((100..108).map(|i| stream(&api, i, 20))).await;
        assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
        assert_eq!(
            prompt_tokens(url.clone()).await,
            before,
            "a draining worker got new requests"
        );
    })
    .await;
    for (i, (r, b)) in results.iter().zip(&baseline).enumerate() {
        let (text, tokens) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("stream {i} failed: {e}"));
        assert_eq!(*tokens, 400, "stream {i}");
        assert_eq!(text, &b.0, "stream {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_at_run_time_gets_requests_within_two_seconds() {
    let serve = Serve::start(&["--router-mode", "round-robin", "--workers", "1"]);
    serve.wait_live(1, Duration::from_secs(10)).await;
    let added: Value = reqwest::Client::new()
        .post(format!("{}/workers", serve.control))
        .send()
        .await
        .expect("control API")
        .json()
        .await
        .expect("json");
    let url = added["url"]
        .as_str()
        .expect("the new worker's URL")
        .to_owned();
    let started = Instant::now();
    let mut client = dynamo_protocol::proto::worker_client::WorkerClient::connect(url)
        .await
        .expect("connect");
    loop {
        // Traffic keeps flowing; round-robin gives the newcomer every other request once it joins.
        let _ = stream(&serve.api, 7, 4).await;
        let load = client
            .load(dynamo_protocol::proto::LoadRequest {})
            .await
            .expect("load")
            .into_inner();
        if load.prompt_tokens_total > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the added worker got no request within 2 s"
        );
    }
    eprintln!("added worker's first request after {:?}", started.elapsed());
    // Removing it: it leaves the frontend's set, and requests keep succeeding.
    let name = added["name"].as_str().expect("name");
    let r = reqwest::Client::new()
        .delete(format!("{}/workers/{name}", serve.control))
        .send()
        .await
        .expect("control API");
    assert_eq!(r.status(), 200);
    serve.wait_live(1, Duration::from_secs(5)).await;
    let after: Vec<_> = futures::future::join_all((0..6).map(|i| stream(&serve.api, i, 8))).await;
    assert!(after.iter().all(Result::is_ok), "{after:?}");
}

/// manifests/planner.yaml made quick: a 10 s planner interval at speedup 10 (1 s of wall time), one
/// worker to start with, at most 3 GPUs.
fn quick_planner_manifest(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(format!(
        "{}/../../manifests/planner.yaml",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    ))
    .expect("manifests/planner.yaml");
    let text = text
        .replace("interval: 60s", "interval: 10s")
        .replace("gpuBudget: 10", "gpuBudget: 3")
        .replace("replicas: 2", "replicas: 1");
    assert!(text.contains("gpuBudget: 3") && text.contains("interval: 10s"));
    let path = dir.join("planner.yaml");
    std::fs::write(&path, text).expect("write the manifest");
    path.display().to_string()
}

/// One streamed completion of `prompt_tokens` token ids: Ok, or why it failed.
async fn completion(
    client: &reqwest::Client,
    api: &str,
    i: u32,
    prompt_tokens: u32,
) -> Result<(), String> {
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|t| 300 + (i * 7919 + t * 31) % 7800)
        .collect();
    let r = client
        .post(format!("{api}/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": prompt, "max_tokens": 40, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() || text.contains("data: {\"error\"") || !text.contains("[DONE]") {
        return Err(format!(
            "status {status}: {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_scales_up_under_load_within_its_budget_and_back_down_after() {
    let dir = std::env::temp_dir().join(format!("planner-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let manifest = quick_planner_manifest(&dir);
    let serve = Serve::start_manifest(&manifest, &["--speedup-ratio", "10"]);
    serve.wait_live(1, Duration::from_secs(10)).await;

    // 4,000-token prompts at 20 per second of wall time (2 per trace second): about 130% of one
    // engine's time goes to prefill, so the ITL target needs more engines than the budget allows.
    let client = reqwest::Client::new();
    let (api, most) = (
        serve.api.clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let load = {
        let (client, api) = (client.clone(), api.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for i in 0..160u32 {
                let (client, api) = (client.clone(), api.clone());
                tasks.push(tokio::spawn(async move {
                    completion(&client, &api, i, 4000).await
                }));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            futures::future::join_all(tasks).await
        })
    };
    let watch = {
        let most = most.clone();
        let serve_api = serve.api.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(r) = reqwest::get(format!("{serve_api}/health")).await
                    && let Ok(v) = r.json::<Value>().await
                {
                    most.fetch_max(
                        v["live_workers"].as_u64().unwrap_or(0),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let results = load.await.expect("load task");
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.expect("request task").err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let peak = most.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        peak, 3,
        "scaled up to the GPU budget (3 workers of 1 GPU), never past it"
    );

    // Without load the fleet goes back to the floor of 1, a quarter (at least one) per interval.
    serve.wait_live(1, Duration::from_secs(30)).await;
    watch.abort();
    let planner: Value = reqwest::get(format!("{}/planner", serve.control))
        .await
        .expect("control API")
        .json()
        .await
        .expect("json");
    assert_eq!(planner["algorithm"], "sla");
    assert_eq!(planner["bounds"], json!({"Worker": {"min": 1, "max": 3}}));
    assert_eq!(planner["last"]["replicas"], json!({"aggregated": 1}));
    assert!(
        planner["profiles"]["Worker"]
            .as_str()
            .is_some_and(|p| p.starts_with("described by the built-in engine")),
        "{planner}"
    );
    let described: Value = reqwest::get(format!("{}/profiles", serve.api))
        .await
        .expect("profiles")
        .json()
        .await
        .expect("json");
    assert!(
        described["aggregated"]["decode"]
            .as_array()
            .is_some_and(|d| !d.is_empty()),
        "the frontend serves the workers' profiles: {described}"
    );
    assert!(planner["decisions"].as_u64().unwrap_or(0) >= 3, "{planner}");
    assert!(
        planner["last"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{planner}"
    );
    let metrics = reqwest::get(format!("{}/metrics", serve.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("dynamo_frontend_worker_gpus{role=\"aggregated\"} 1"),
        "the frontend counts the live workers' GPUs"
    );
    assert!(
        metrics.contains("dynamo_frontend_sla_requests_total{met="),
        "the frontend judges requests against spec.sla"
    );
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The live workers of each role, as the frontend reports them.
async fn live_by_role(api: &str) -> (u64, u64) {
    let Ok(r) = reqwest::get(format!("{api}/metrics")).await else {
        return (0, 0);
    };
    let text = r.text().await.unwrap_or_default();
    let of = |role: &str| {
        let key = format!("dynamo_frontend_live_workers{{role=\"{role}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (of("prefill"), of("decode"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_sizes_prefill_and_decode_pools_apart_within_one_budget() {
    let dir = std::env::temp_dir().join(format!("disagg-planner-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // manifests/disagg-planner.yaml made quick: a 10 s interval at speedup 10, a budget of 4 GPUs,
    // and small KV blocks (the test is about sizing, not about moving bytes).
    let text = std::fs::read_to_string(format!(
        "{}/../../manifests/disagg-planner.yaml",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    ))
    .expect("manifests/disagg-planner.yaml")
    .replace("interval: 60s", "interval: 10s")
    .replace("gpuBudget: 6", "gpuBudget: 4")
    .replace("\"llama-1b\"", "\"tiny\"");
    assert!(text.contains("gpuBudget: 4") && text.contains("\"tiny\""));
    let manifest = dir.join("disagg-planner.yaml");
    std::fs::write(&manifest, text).expect("write the manifest");
    let serve = Serve::start_manifest(&manifest.display().to_string(), &["--speedup-ratio", "10"]);
    serve.wait_live(2, Duration::from_secs(10)).await;

    // 4,000-token prompts (all prefilled by the prefill pool under isl_bounding) at 40 per
    // second of wall time: more prefill than one prefill engine keeps up with at the TTFT target.
    let client = reqwest::Client::new();
    let peak = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, 0u64)));
    let watch = {
        let (peak, api) = (peak.clone(), serve.api.clone());
        tokio::spawn(async move {
            loop {
                let (p, d) = live_by_role(&api).await;
                {
                    let mut m = peak.lock().expect("lock");
                    *m = (m.0.max(p), m.1.max(d), m.2.max(p + d));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..320u32 {
        let (client, api) = (client.clone(), serve.api.clone());
        tasks.push(tokio::spawn(async move {
            completion(&client, &api, i, 4000).await
        }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let failed: Vec<String> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter_map(|r| r.expect("request task").err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let (prefill_peak, _, total_peak) = *peak.lock().expect("lock");
    assert!(prefill_peak >= 2, "the prefill pool grew: {prefill_peak}");
    assert!(
        total_peak <= 4,
        "never past the budget of 4 GPUs: {total_peak}"
    );

    // Without load both pools go back to their floors of 1.
    let deadline = Instant::now() + Duration::from_secs(40);
    while live_by_role(&serve.api).await != (1, 1) {
        assert!(Instant::now() < deadline, "pools never went back to 1 + 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watch.abort();
    let planner: Value = reqwest::get(format!("{}/planner", serve.control))
        .await
        .expect("control API")
        .json()
        .await
        .expect("json");
    assert_eq!(
        planner["services"],
        json!({"prefill": "Prefill", "decode": "Decode"})
    );
    assert_eq!(
        planner["bounds"],
        json!({"Prefill": {"min": 1, "max": 3}, "Decode": {"min": 1, "max": 3}})
    );
    assert_eq!(
        planner["last"]["replicas"],
        json!({"prefill": 1, "decode": 1}),
        "{planner}"
    );
    assert!(
        planner["learned"]["remoteShare"].as_f64().unwrap_or(0.0) > 0.5,
        "{planner}"
    );
    let metrics = reqwest::get(format!("{}/metrics", serve.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("dynamo_frontend_disagg_prompt_tokens_total{decision=\"remote\"}"),
        "the frontend counts the prompt tokens it sends to the prefill pool"
    );
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}
