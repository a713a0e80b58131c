//! Reading a `DynamoGraphDeployment` manifest for `dynamo serve`: the subset of the CRD that
//! decides what runs locally (services, their component type, replicas, env and container args).
//!
//! The operator validates the full CRD through the API server; here we check what `serve` relies
//! on and say precisely what is wrong and how to fix it.

use std::path::Path;

use dynamo_crds::{ComponentType, DynamoGraphDeploymentSpec, ExtraPodSpec, SubComponentType};
use serde::Deserialize;

use crate::serve::engine::EngineSpec;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("could not read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid DynamoGraphDeployment: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A manifest as `kubectl apply` reads it: the CRD's own spec type (`dynamo-crds`), so `serve` and
/// the operator never disagree on its shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: DynamoGraphDeploymentSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
}

/// What `serve` runs for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Frontend,
    Worker,
}

/// A service resolved for local running.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub name: String,
    pub role: Role,
    pub replicas: u32,
    /// Graph-level then service-level env.
    pub env: Vec<(String, String)>,
    /// Arguments for the `dynamo frontend|sidecar` subcommand taken from the container.
    pub args: Vec<String>,
    /// The pod's `engine` container (a worker whose engine runs beside its sidecar).
    pub engine: Option<EngineSpec>,
}

/// The graph as `serve` runs it.
#[derive(Debug, Clone)]
pub struct LocalGraph {
    pub name: String,
    pub frontend: LocalService,
    pub workers: Vec<LocalService>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: p.clone(),
            source,
        })?;
        Manifest::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_saphyr::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: path.into(),
            message,
        };
        if m.kind != "DynamoGraphDeployment" {
            return Err(invalid(format!(
                "kind is {:?}; `dynamo serve` runs kind: DynamoGraphDeployment",
                m.kind
            )));
        }
        if !m.api_version.starts_with("nvidia.com/") {
            return Err(invalid(format!(
                "apiVersion is {:?}; expected nvidia.com/v1alpha1",
                m.api_version
            )));
        }
        if m.spec.services.is_empty() {
            return Err(invalid(
                "spec.services is empty; add a frontend service and at least one worker service"
                    .into(),
            ));
        }
        Ok(m)
    }

    /// Resolves the services into what runs locally.
    pub fn local_graph(&self, path: &str) -> Result<LocalGraph, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            path: path.into(),
            message,
        };
        let mut frontend = None;
        let mut workers = Vec::new();
        for (name, svc) in &self.spec.services {
            let replicas = match svc.replicas {
                None => 1,
                Some(r) if r < 0 => {
                    return Err(invalid(format!(
                        "spec.services.{name}.replicas is {r}; it must be 0 or more"
                    )));
                }
                Some(r) => u32::try_from(r).map_err(|_| {
                    invalid(format!("spec.services.{name}.replicas is too large ({r})"))
                })?,
            };
            let (role, worker_role) = match (svc.component_type, svc.sub_component_type) {
                (ComponentType::Frontend, _) => (Role::Frontend, None),
                (ComponentType::Prefill, _)
                | (
                    ComponentType::Worker | ComponentType::Decode,
                    Some(SubComponentType::Prefill),
                ) => (Role::Worker, Some("prefill")),
                (ComponentType::Decode, _)
                | (ComponentType::Worker, Some(SubComponentType::Decode)) => {
                    (Role::Worker, Some("decode"))
                }
                (ComponentType::Worker, None) => (Role::Worker, None),
                (ComponentType::Planner, _) => continue,
            };
            let mut env: Vec<(String, String)> = self
                .spec
                .envs
                .iter()
                .chain(&svc.envs)
                .map(|e| {
                    if e.value_from.is_some() {
                        tracing::warn!(service = %name, env = %e.name, "valueFrom is resolved by Kubernetes, not by `dynamo serve`; the variable is empty locally");
                    }
                    (e.name.clone(), e.value.clone().unwrap_or_default())
                })
                .collect();
            env.dedup_by(|a, b| a.0 == b.0);
            let mut args = container_args(name, svc.extra_pod_spec.as_ref(), &role);
            if let Some(r) = worker_role {
                // First, so that a --role in the manifest's own args wins.
                args.splice(0..0, ["--role".to_owned(), r.to_owned()]);
            }
            let engine = match role {
                Role::Worker => svc
                    .extra_pod_spec
                    .as_ref()
                    .and_then(|e| EngineSpec::from_pod_spec(&e.pod_spec)),
                Role::Frontend => None,
            };
            let local = LocalService {
                name: name.clone(),
                role: role.clone(),
                replicas,
                env,
                args,
                engine,
            };
            match role {
                Role::Frontend if frontend.is_some() => {
                    return Err(invalid(format!(
                        "more than one frontend service (second: {name}); a graph has at most one"
                    )));
                }
                Role::Frontend => frontend = Some(local),
                Role::Worker => workers.push(local),
            }
        }
        let frontend = frontend.ok_or_else(|| {
            invalid(
                "no service has componentType: frontend; add one (see manifests/agg.yaml)".into(),
            )
        })?;
        if workers.iter().all(|w| w.replicas == 0) {
            return Err(invalid(
                "no worker replicas: add a service with componentType: worker and replicas >= 1"
                    .into(),
            ));
        }
        Ok(LocalGraph {
            name: self.metadata.name.clone(),
            frontend,
            workers,
        })
    }
}

/// The container's arguments for our own subcommand, when the container runs `dynamo`.
/// Containers running other programs (e.g. Dynamo's Python images) contribute no arguments.
fn container_args(name: &str, spec: Option<&ExtraPodSpec>, role: &Role) -> Vec<String> {
    let Some(c) = spec.and_then(|s| s.main_container.as_ref()) else {
        return Vec::new();
    };
    let sub = match role {
        Role::Frontend => "frontend",
        Role::Worker => "sidecar",
    };
    let mut words: Vec<&str> = c
        .command
        .iter()
        .chain(&c.args)
        .map(String::as_str)
        .collect();
    if words.first().is_some_and(|w| w.ends_with("dynamo")) {
        words.remove(0);
    }
    match words.first() {
        Some(w) if *w == sub => words[1..].iter().map(|s| (*s).to_owned()).collect(),
        None => Vec::new(),
        Some(_) => {
            tracing::warn!(
                service = name,
                "container does not run `dynamo {sub}`; its arguments are ignored locally"
            );
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGG: &str = r#"
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata:
  name: agg
spec:
  envs:
    - name: DYN_LOG
      value: info
  services:
    Frontend:
      componentType: frontend
      replicas: 1
      extraPodSpec:
        mainContainer:
          command: ["dynamo"]
          args: ["frontend", "--router-mode", "random"]
    Worker:
      componentType: worker
      replicas: 2
      extraPodSpec:
        mainContainer:
          args: ["sidecar", "--speedup-ratio", "5"]
"#;

    #[test]
    fn agg_manifest_resolves_to_one_frontend_and_two_workers() {
        let m = Manifest::parse("agg.yaml", AGG).expect("valid");
        let g = m.local_graph("agg.yaml").expect("valid graph");
        assert_eq!(g.name, "agg");
        assert_eq!(g.frontend.args, ["--router-mode", "random"]);
        assert_eq!(g.workers.len(), 1);
        assert_eq!(g.workers[0].replicas, 2);
        assert_eq!(g.workers[0].args, ["--speedup-ratio", "5"]);
        assert_eq!(
            g.workers[0].env,
            [("DYN_LOG".to_string(), "info".to_string())]
        );
    }

    #[test]
    fn negative_replicas_are_refused_with_the_field_path() {
        let bad = AGG.replace("replicas: 2", "replicas: -1");
        let m = Manifest::parse("x.yaml", &bad).expect("parses");
        let e = m.local_graph("x.yaml").expect_err("refused").to_string();
        assert!(e.contains("spec.services.Worker.replicas is -1"), "{e}");
    }

    #[test]
    fn unknown_component_type_is_refused() {
        let bad = AGG.replace("componentType: worker", "componentType: wrker");
        let e = Manifest::parse("x.yaml", &bad)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("`wrker`") && e.contains("expected one of") && e.contains("line 19"),
            "{e}"
        );
    }

    #[test]
    fn every_example_manifest_parses_as_the_crd() {
        let dir = &format!(
            "{}/../../manifests",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("manifests dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Manifest::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "{n} manifests");
    }

    #[test]
    fn two_frontends_are_refused() {
        let bad = AGG.replace(
            "    Worker:\n      componentType: worker",
            "    Worker:\n      componentType: frontend",
        );
        let e = Manifest::parse("x.yaml", &bad)
            .expect("parses")
            .local_graph("x.yaml")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("more than one frontend"), "{e}");
    }

    #[test]
    fn wrong_kind_and_broken_yaml_are_refused() {
        let e = Manifest::parse(
            "x.yaml",
            &AGG.replace("kind: DynamoGraphDeployment", "kind: Deployment"),
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("kind is \"Deployment\""), "{e}");
        let e = Manifest::parse("x.yaml", "spec: [")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a valid DynamoGraphDeployment"), "{e}");
    }

    #[test]
    fn prefill_and_decode_services_run_sidecars_with_their_role() {
        let text = std::fs::read_to_string(
            std::path::Path::new(
                &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            )
            .join("../../manifests/disagg.yaml"),
        )
        .expect("manifests/disagg.yaml");
        let graph = Manifest::parse("disagg.yaml", &text)
            .expect("parses")
            .local_graph("disagg.yaml")
            .expect("runs locally");
        let roles: Vec<(&str, &[String])> = graph
            .workers
            .iter()
            .map(|w| (w.name.as_str(), &w.args[..2]))
            .collect();
        assert!(
            roles.contains(&("Prefill", &["--role".into(), "prefill".into()][..])),
            "{roles:?}"
        );
        assert!(
            roles.contains(&("Decode", &["--role".into(), "decode".into()][..])),
            "{roles:?}"
        );
    }
}
