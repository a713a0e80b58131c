//! What every pod the operator makes gets so that it starts, serves, drains and stops well:
//! probes on the main container, a termination grace period with a drain deadline inside it, a
//! restricted security context with writable scratch directories, and `imagePullPolicy:
//! IfNotPresent` on every container.
//!
//! Each default is added only where the service's `extraPodSpec` (or `mainContainer`, or envs)
//! does not already set that field, so a manifest can always say otherwise. Whole security
//! contexts are kept as given rather than merged field by field: a user who sets
//! `runAsUser: 0` must not also get our `runAsNonRoot: true`. Other containers of the pod (init
//! containers included) get only the pull policy, and are otherwise left as the manifest gives
//! them, except an engine container beside a worker's sidecar ([`apply_engine`]). Pure: no API
//! calls; [`crate::gang::build_pod`] calls [`apply`] and [`apply_engine`].

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, HTTPGetAction, PodSecurityContext,
    PodSpec, Probe, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Default `terminationGracePeriodSeconds`.
pub const GRACE_PERIOD_SECS: i64 = 30;
/// The data plane's default `DYN_SHUTDOWN_SETTLE`: readiness is 503 this long before it stops
/// accepting.
pub const SHUTDOWN_SETTLE: Duration = Duration::from_secs(2);
/// Time left between the end of the drain and the kubelet's SIGKILL, for the process to exit.
pub const EXIT_MARGIN: Duration = Duration::from_secs(3);
/// The `nonroot` user and group of distroless images (the data plane image runs as it).
pub const NONROOT_ID: i64 = 65532;
/// Its home; `HOME` points here unless a manifest sets it.
pub const NONROOT_HOME: &str = "/home/nonroot";
/// Writable scratch volumes (emptyDir) and where the main container mounts them.
pub const SCRATCH: [(&str, &str); 2] = [("tmp", "/tmp"), ("cache", "/home/nonroot/.cache")];

/// Every container's pull policy unless the manifest sets one: a node that has the image already
/// (preloaded, or pulled for an earlier pod) starts the pod without asking the registry, even for
/// a `:latest` tag, for which Kubernetes would default to `Always`.
pub const IMAGE_PULL_POLICY: &str = "IfNotPresent";

/// Readiness on `/health` (503 while starting and while draining), liveness on `/live`.
pub const READY_PATH: &str = "/health";
pub const LIVE_PATH: &str = "/live";

/// Adds the lifecycle defaults to `pod` and its `main` container (and the pull policy to the
/// pod's other containers). `serving` is the port (name or number) of the process's HTTP health
/// endpoints, or `None` for components that have none we know of (the planner): they get
/// everything but probes.
pub fn apply(pod: &mut PodSpec, main: &mut Container, serving: Option<IntOrString>) {
    let others = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for c in std::iter::once(&mut *main).chain(others) {
        set_default_pull_policy(c);
    }
    if let Some(port) = serving {
        let get = |path: &str| http_get(path, port.clone());
        main.readiness_probe.get_or_insert_with(|| Probe {
            http_get: Some(get(READY_PATH)),
            period_seconds: Some(5),
            timeout_seconds: Some(2),
            failure_threshold: Some(2),
            success_threshold: Some(1),
            ..Default::default()
        });
        main.liveness_probe.get_or_insert_with(|| Probe {
            http_get: Some(get(LIVE_PATH)),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        });
        // Engines load weights before they answer: up to 2 minutes, checked every 2 s, before
        // liveness takes over.
        main.startup_probe.get_or_insert_with(|| Probe {
            http_get: Some(get(LIVE_PATH)),
            period_seconds: Some(2),
            timeout_seconds: Some(2),
            failure_threshold: Some(60),
            ..Default::default()
        });
    }

    let grace = *pod
        .termination_grace_period_seconds
        .get_or_insert(GRACE_PERIOD_SECS);
    let env = main.env.get_or_insert_with(Vec::new);
    let settle = env
        .iter()
        .find(|e| e.name == "DYN_SHUTDOWN_SETTLE")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| humantime::parse_duration(v).ok())
        .unwrap_or(SHUTDOWN_SETTLE);
    set_default_env(
        env,
        "DYN_DRAIN_TIMEOUT",
        &format!("{}s", drain_timeout(grace, settle).as_secs()),
    );
    set_default_env(env, "HOME", NONROOT_HOME);

    pod.security_context
        .get_or_insert_with(|| PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT_ID),
            run_as_group: Some(NONROOT_ID),
            fs_group: Some(NONROOT_ID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        });
    main.security_context
        .get_or_insert_with(restricted_container_context);

    for (name, path) in SCRATCH {
        mount_scratch(pod, main, name, path, None);
    }
}

/// Mounts emptyDir volume `name` (of `medium`, default disk) at `path` in `container`, unless the
/// container mounts something there already; the volume is added to the pod if it lacks one of
/// that name.
fn mount_scratch(
    pod: &mut PodSpec,
    container: &mut Container,
    name: &str,
    path: &str,
    medium: Option<&str>,
) {
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    if mounts.iter().any(|m| m.mount_path == path) {
        return;
    }
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == name) {
        volumes.push(Volume {
            name: name.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: medium.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    mounts.push(VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    });
}

/// An HTTP GET of `path` on `port` (for probes).
fn http_get(path: &str, port: IntOrString) -> HTTPGetAction {
    HTTPGetAction {
        path: Some(path.into()),
        port,
        scheme: Some("HTTP".into()),
        ..Default::default()
    }
}

/// The longest drain that still ends before the kubelet's SIGKILL: the grace period less the
/// settle window and [`EXIT_MARGIN`] (25 s for the default 30 s grace, 2 s settle), never negative.
pub fn drain_timeout(grace_secs: i64, settle: Duration) -> Duration {
    let grace = Duration::from_secs(grace_secs.max(0) as u64);
    grace.saturating_sub(settle).saturating_sub(EXIT_MARGIN)
}

/// The name of an engine container beside a worker's sidecar (`extraPodSpec.containers`).
pub const ENGINE_CONTAINER: &str = "engine";
/// Writable volumes of the engine container: scratch, its caches (model compilation, Hugging Face,
/// torch) under `HOME`, and a memory-backed `/dev/shm` (engines share tensors between their
/// processes through it; the runtime's default is 64 MiB).
pub const ENGINE_SCRATCH: [(&str, &str, Option<&str>); 3] = [
    ("engine-tmp", "/tmp", None),
    ("engine-cache", "/home/nonroot/.cache", None),
    ("engine-shm", "/dev/shm", Some("Memory")),
];
/// How long an engine may load before its startup probe gives up: 10 minutes, checked every 5 s.
pub const ENGINE_STARTUP_CHECKS: i32 = 120;

/// Defaults for an engine container (a vLLM server beside the sidecar): the restricted
/// securityContext the sidecar has, with writable emptyDirs for what the engine writes, `HOME` on
/// its cache volume, and a startup and liveness probe on its `/health` at its `--port` (vLLM's
/// default 8000). The sidecar's readiness already follows the engine's health. Whatever the
/// manifest sets is kept.
pub fn apply_engine(pod: &mut PodSpec, engine: &mut Container) {
    engine
        .security_context
        .get_or_insert_with(restricted_container_context);
    let env = engine.env.get_or_insert_with(Vec::new);
    set_default_env(env, "HOME", NONROOT_HOME);
    for (name, path, medium) in ENGINE_SCRATCH {
        mount_scratch(pod, engine, name, path, medium);
    }
    let port = engine_port(engine);
    let get = || http_get("/health", IntOrString::Int(port));
    engine.startup_probe.get_or_insert_with(|| Probe {
        http_get: Some(get()),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(ENGINE_STARTUP_CHECKS),
        ..Default::default()
    });
    engine.liveness_probe.get_or_insert_with(|| Probe {
        http_get: Some(get()),
        period_seconds: Some(10),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    });
}

/// The engine's HTTP port: its `--port` argument, else vLLM's default 8000.
fn engine_port(c: &Container) -> i32 {
    let words: Vec<&str> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect();
    words
        .iter()
        .enumerate()
        .find_map(|(i, w)| match w.strip_prefix("--port=") {
            Some(v) => v.parse().ok(),
            None if *w == "--port" => words.get(i + 1)?.parse().ok(),
            None => None,
        })
        .unwrap_or(8000)
}

fn restricted_container_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// Sets [`IMAGE_PULL_POLICY`] unless the container has a pull policy (an empty one counts as
/// none, as the API server defaults it).
fn set_default_pull_policy(c: &mut Container) {
    if c.image_pull_policy.as_deref().is_none_or(str::is_empty) {
        c.image_pull_policy = Some(IMAGE_PULL_POLICY.into());
    }
}

/// Adds `name=value` unless the container already has a variable of that name.
pub fn set_default_env(env: &mut Vec<EnvVar>, name: &str, value: &str) {
    if !env.iter().any(|e| e.name == name) {
        env.push(EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)?
            .value
            .as_deref()
    }

    #[test]
    fn a_bare_pod_gets_probes_grace_drain_and_a_restricted_context() {
        let (mut pod, mut main) = (PodSpec::default(), Container::default());
        apply(
            &mut pod,
            &mut main,
            Some(IntOrString::String("grpc".into())),
        );
        let ready = main.readiness_probe.clone().and_then(|p| p.http_get);
        assert_eq!(
            ready.map(|h| (h.path, h.port)),
            Some((Some("/health".into()), IntOrString::String("grpc".into())))
        );
        let live = main.liveness_probe.clone().and_then(|p| p.http_get);
        assert_eq!(live.and_then(|h| h.path).as_deref(), Some("/live"));
        let startup = main.startup_probe.clone().expect("startup probe");
        assert_eq!(
            (startup.failure_threshold, startup.period_seconds),
            (Some(60), Some(2))
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        assert_eq!(env(&main, "DYN_DRAIN_TIMEOUT"), Some("25s"));
        assert_eq!(env(&main, "HOME"), Some("/home/nonroot"));
        let psc = pod.security_context.clone().expect("pod securityContext");
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
            (Some(true), Some(65532), Some(65532))
        );
        assert_eq!(
            psc.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let csc = main
            .security_context
            .clone()
            .expect("container securityContext");
        assert_eq!(
            (
                csc.allow_privilege_escalation,
                csc.read_only_root_filesystem
            ),
            (Some(false), Some(true))
        );
        assert_eq!(
            csc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let mounts: Vec<_> = main
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(mounts, [("tmp", "/tmp"), ("cache", "/home/nonroot/.cache")]);
        assert!(pod.volumes.iter().flatten().all(|v| v.empty_dir.is_some()));
    }

    #[test]
    fn what_the_manifest_sets_is_kept() {
        let mut pod = PodSpec {
            termination_grace_period_seconds: Some(120),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut main = Container {
            readiness_probe: Some(Probe {
                period_seconds: Some(1),
                ..Default::default()
            }),
            env: Some(vec![EnvVar {
                name: "DYN_SHUTDOWN_SETTLE".into(),
                value: Some("10s".into()),
                value_from: None,
            }]),
            volume_mounts: Some(vec![VolumeMount {
                name: "scratch".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        apply(&mut pod, &mut main, Some(IntOrString::Int(9000)));
        assert_eq!(
            main.readiness_probe.as_ref().and_then(|p| p.period_seconds),
            Some(1)
        );
        assert!(
            main.liveness_probe.is_some(),
            "unset probes are still added"
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(120));
        let psc = pod.security_context.expect("kept");
        assert_eq!((psc.run_as_user, psc.run_as_non_root), (Some(0), None));
        // 120 s grace - 10 s settle - 3 s margin.
        assert_eq!(env(&main, "DYN_DRAIN_TIMEOUT"), Some("107s"));
        let mounts: Vec<_> = main
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/tmp", "/home/nonroot/.cache"]);
        assert_eq!(pod.volumes.map(|v| v.len()), Some(1), "no tmp volume");
    }

    #[test]
    fn every_container_pulls_if_not_present_unless_the_manifest_says_otherwise() {
        let container = |name: &str, policy: Option<&str>| Container {
            name: name.into(),
            image_pull_policy: policy.map(Into::into),
            ..Default::default()
        };
        let mut pod = PodSpec {
            containers: vec![
                container("sidecar", None),
                container("pinned", Some("Always")),
            ],
            init_containers: Some(vec![container("init", Some(""))]),
            ..Default::default()
        };
        let mut main = container("main", None);
        apply(&mut pod, &mut main, None);
        let policy = |c: &Container| c.image_pull_policy.clone().unwrap_or_default();
        assert_eq!(policy(&main), "IfNotPresent");
        let others: Vec<_> = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
            .map(|c| (c.name.as_str(), policy(c)))
            .collect();
        assert_eq!(
            others,
            [
                ("sidecar", "IfNotPresent".to_string()),
                ("pinned", "Always".to_string()),
                ("init", "IfNotPresent".to_string()),
            ]
        );
        let mut main = container("main", Some("Never"));
        apply(&mut PodSpec::default(), &mut main, None);
        assert_eq!(policy(&main), "Never");
    }

    #[test]
    fn a_component_without_health_endpoints_gets_no_probes() {
        let (mut pod, mut main) = (PodSpec::default(), Container::default());
        apply(&mut pod, &mut main, None);
        assert!(main.readiness_probe.is_none() && main.liveness_probe.is_none());
        assert!(main.security_context.is_some());
    }

    #[test]
    fn the_drain_ends_before_the_kill_even_with_a_short_grace() {
        assert_eq!(drain_timeout(30, SHUTDOWN_SETTLE), Duration::from_secs(25));
        assert_eq!(drain_timeout(4, SHUTDOWN_SETTLE), Duration::ZERO);
        assert_eq!(drain_timeout(-1, SHUTDOWN_SETTLE), Duration::ZERO);
    }
}
