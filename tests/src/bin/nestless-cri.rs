//! `nestless-cri`: a small CRI client that speaks to containerd as kubelet does (gRPC,
//! `runtime.v1`), for tests and the demo where `crictl` is not packaged. Every command
//! prints one JSON document on stdout; errors go to stderr with exit status 1.
//!
//! ```text
//! nestless-cri [--endpoint SOCKET] [--timeout SECS] COMMAND
//!   version
//!   runp --name N [--namespace NS] [--uid U] [--handler H] [--port CPORT:HPORT]...
//!        [--annotation K=V]... [--label K=V]...          RunPodSandbox      -> {"id", "ms"}
//!   inspectp [--verbose] POD                              PodSandboxStatus   -> {"id", "state", "ip", ...}
//!   pods                                                  ListPodSandbox     -> [{"id", "name", ...}]
//!   stopp POD | rmp POD                                   StopPodSandbox / RemovePodSandbox -> {"id", "ms"}
//!   run --pod POD --name N --image IMG [-- CMD...]        CreateContainer + StartContainer -> {"id", ...}
//!   exec [--timeout SECS] CONTAINER -- CMD...             ExecSync           -> {"exit_code", "stdout", "stderr", "ms"}
//!   ps [--pod POD]                                        ListContainers     -> [{"id", "name", ...}]
//!   stop [--timeout SECS] CONTAINER | rm CONTAINER        StopContainer / RemoveContainer -> {"id", "ms"}
//! ```
//!
//! The sandbox config that `CreateContainer` needs is rebuilt from `PodSandboxStatus`
//! (metadata, labels, annotations), so that a caller need not keep it between commands.
//! `"ms"` fields are the duration of the gRPC calls as seen by this client.

use std::{collections::HashMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{self as cri, runtime_service_client::RuntimeServiceClient};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::{net::UnixStream, time::Instant};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser, Debug)]
#[command(name = "nestless-cri", about = "A CRI client with JSON output")]
struct Args {
    /// containerd's socket (CRI is served on it).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    endpoint: PathBuf,
    /// Deadline of each call, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Version: the runtime's name and CRI version.
    Version,
    /// RunPodSandbox.
    Runp {
        /// Pod name (metadata.name).
        #[arg(long)]
        name: String,
        /// Pod namespace (metadata.namespace).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Pod uid (default: derived from the name).
        #[arg(long)]
        uid: Option<String>,
        /// Runtime handler (containerd's runtime name), e.g. `nestless`.
        #[arg(long, default_value = "")]
        handler: String,
        /// A port mapping CONTAINER_PORT:HOST_PORT[/tcp|/udp] (CNI portmap; TCP unless
        /// named).
        #[arg(long = "port", value_parser = parse_port)]
        ports: Vec<(i32, i32, i32)>,
        /// A pod annotation K=V.
        #[arg(long = "annotation", value_parser = parse_kv)]
        annotations: Vec<(String, String)>,
        /// A pod label K=V.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// PodSandboxStatus.
    Inspectp {
        /// Ask for the runtime's verbose info (parsed as JSON where it is JSON).
        #[arg(long)]
        verbose: bool,
        /// The pod sandbox id.
        pod: String,
    },
    /// ListPodSandbox.
    Pods,
    /// StopPodSandbox.
    Stopp {
        /// The pod sandbox id.
        pod: String,
    },
    /// RemovePodSandbox.
    Rmp {
        /// The pod sandbox id.
        pod: String,
    },
    /// CreateContainer then StartContainer.
    Run {
        /// The pod sandbox id.
        #[arg(long)]
        pod: String,
        /// Container name.
        #[arg(long)]
        name: String,
        /// Image reference (already in containerd's `k8s.io` namespace).
        #[arg(long)]
        image: String,
        /// The command (default: the image's).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// ExecSync.
    Exec {
        /// Seconds before the runtime stops the command (0: none).
        #[arg(long, default_value_t = 60)]
        timeout: i64,
        /// The container id.
        container: String,
        /// The command.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// ListContainers.
    Ps {
        /// Only the containers of this pod sandbox.
        #[arg(long)]
        pod: Option<String>,
    },
    /// StopContainer.
    Stop {
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 10)]
        timeout: i64,
        /// The container id.
        container: String,
    },
    /// RemoveContainer.
    Rm {
        /// The container id.
        container: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

/// `CONTAINER_PORT:HOST_PORT[/tcp|/udp]` as (container port, host port, CRI protocol).
fn parse_port(s: &str) -> Result<(i32, i32, i32), String> {
    let bad = || format!("{s:?} is not CONTAINER_PORT:HOST_PORT[/tcp|/udp]");
    let (ports, protocol) = match s.rsplit_once('/') {
        None => (s, cri::Protocol::Tcp),
        Some((p, "tcp")) => (p, cri::Protocol::Tcp),
        Some((p, "udp")) => (p, cri::Protocol::Udp),
        Some(_) => return Err(bad()),
    };
    let (c, h) = ports.split_once(':').ok_or_else(bad)?;
    Ok((
        c.parse().map_err(|_| bad())?,
        h.parse().map_err(|_| bad())?,
        protocol as i32,
    ))
}

/// What `runp`, `stopp`, `rmp`, `stop` and `rm` print.
#[derive(Serialize)]
struct Done {
    id: String,
    ms: f64,
}

/// What `run` prints.
#[derive(Serialize)]
struct Started {
    id: String,
    create_ms: f64,
    start_ms: f64,
}

/// What `exec` prints.
#[derive(Serialize)]
struct Executed {
    exit_code: i32,
    stdout: String,
    stderr: String,
    ms: f64,
}

/// What `inspectp` prints.
#[derive(Serialize)]
struct PodView {
    id: String,
    name: String,
    namespace: String,
    uid: String,
    state: &'static str,
    created_at: i64,
    /// The pod IP CRI reports (the CNI result's first address).
    ip: String,
    additional_ips: Vec<String>,
    runtime_handler: String,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    /// `--verbose` only: the runtime's info, each value parsed as JSON when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<HashMap<String, Value>>,
}

/// One line of `pods`.
#[derive(Serialize)]
struct PodLine {
    id: String,
    name: String,
    namespace: String,
    state: &'static str,
    runtime_handler: String,
}

/// One line of `ps`.
#[derive(Serialize)]
struct ContainerLine {
    id: String,
    name: String,
    pod: String,
    state: &'static str,
    image: String,
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn sandbox_state(s: i32) -> &'static str {
    match cri::PodSandboxState::try_from(s) {
        Ok(cri::PodSandboxState::SandboxReady) => "ready",
        Ok(cri::PodSandboxState::SandboxNotready) => "notready",
        Err(_) => "unknown",
    }
}

fn container_state(s: i32) -> &'static str {
    match cri::ContainerState::try_from(s) {
        Ok(cri::ContainerState::ContainerCreated) => "created",
        Ok(cri::ContainerState::ContainerRunning) => "running",
        Ok(cri::ContainerState::ContainerExited) => "exited",
        Ok(cri::ContainerState::ContainerUnknown) | Err(_) => "unknown",
    }
}

async fn connect(endpoint: PathBuf, timeout: Duration) -> Result<RuntimeServiceClient<Channel>> {
    let path = endpoint.clone();
    // The URI is not used: the connector dials the unix socket.
    let channel = Endpoint::from_static("http://[::1]:50051")
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("cannot connect to CRI at {}", endpoint.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// A gRPC status as an error that names the call.
fn call_failed(call: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("{call} failed: {:?}: {}", s.code(), s.message())
}

/// The sandbox config of an existing pod, rebuilt from its status (for CreateContainer).
async fn sandbox_config(
    client: &mut RuntimeServiceClient<Channel>,
    pod: &str,
) -> Result<cri::PodSandboxConfig> {
    let status = client
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_owned(),
            verbose: false,
        })
        .await
        .map_err(call_failed("PodSandboxStatus"))?
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("PodSandboxStatus of {pod} has no status"))?;
    Ok(cri::PodSandboxConfig {
        metadata: status.metadata,
        labels: status.labels,
        annotations: status.annotations,
        ..Default::default()
    })
}

async fn run(args: Args) -> Result<Value> {
    let mut client = connect(args.endpoint, Duration::from_secs(args.timeout)).await?;
    let c = &mut client;
    Ok(match args.command {
        Cmd::Version => {
            let v = c
                .version(cri::VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(call_failed("Version"))?
                .into_inner();
            json!({
                "runtime_name": v.runtime_name,
                "runtime_version": v.runtime_version,
                "runtime_api_version": v.runtime_api_version,
            })
        }
        Cmd::Runp {
            name,
            namespace,
            uid,
            handler,
            ports,
            annotations,
            labels,
        } => {
            let config = cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    uid: uid.unwrap_or_else(|| format!("uid-{namespace}-{name}")),
                    name: name.clone(),
                    namespace,
                    attempt: 0,
                }),
                hostname: name,
                port_mappings: ports
                    .into_iter()
                    .map(|(container_port, host_port, protocol)| cri::PortMapping {
                        protocol,
                        container_port,
                        host_port,
                        host_ip: String::new(),
                    })
                    .collect(),
                labels: labels.into_iter().collect(),
                annotations: annotations.into_iter().collect(),
                ..Default::default()
            };
            let t = Instant::now();
            let r = c
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: handler,
                })
                .await
                .map_err(call_failed("RunPodSandbox"))?
                .into_inner();
            serde_json::to_value(Done {
                id: r.pod_sandbox_id,
                ms: ms(t),
            })?
        }
        Cmd::Inspectp { verbose, pod } => {
            let r = c
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose,
                })
                .await
                .map_err(call_failed("PodSandboxStatus"))?
                .into_inner();
            let s = r
                .status
                .ok_or_else(|| anyhow!("PodSandboxStatus of {pod} has no status"))?;
            let meta = s.metadata.unwrap_or_default();
            let net = s.network.unwrap_or_default();
            serde_json::to_value(PodView {
                id: s.id,
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                state: sandbox_state(s.state),
                created_at: s.created_at,
                ip: net.ip,
                additional_ips: net.additional_ips.into_iter().map(|p| p.ip).collect(),
                runtime_handler: s.runtime_handler,
                labels: s.labels,
                annotations: s.annotations,
                info: verbose.then(|| {
                    r.info
                        .into_iter()
                        .map(|(k, v)| {
                            let parsed = serde_json::from_str(&v).unwrap_or(Value::String(v));
                            (k, parsed)
                        })
                        .collect()
                }),
            })?
        }
        Cmd::Pods => {
            let r = c
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .map_err(call_failed("ListPodSandbox"))?
                .into_inner();
            let pods: Vec<PodLine> = r
                .items
                .into_iter()
                .map(|p| {
                    let meta = p.metadata.unwrap_or_default();
                    PodLine {
                        id: p.id,
                        name: meta.name,
                        namespace: meta.namespace,
                        state: sandbox_state(p.state),
                        runtime_handler: p.runtime_handler,
                    }
                })
                .collect();
            serde_json::to_value(pods)?
        }
        Cmd::Stopp { pod } => {
            let t = Instant::now();
            c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map_err(call_failed("StopPodSandbox"))?;
            serde_json::to_value(Done { id: pod, ms: ms(t) })?
        }
        Cmd::Rmp { pod } => {
            let t = Instant::now();
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map_err(call_failed("RemovePodSandbox"))?;
            serde_json::to_value(Done { id: pod, ms: ms(t) })?
        }
        Cmd::Run {
            pod,
            name,
            image,
            cmd,
        } => {
            let sandbox = sandbox_config(c, &pod).await?;
            let config = cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata { name, attempt: 0 }),
                image: Some(cri::ImageSpec {
                    image,
                    ..Default::default()
                }),
                command: cmd,
                ..Default::default()
            };
            let t = Instant::now();
            let id = c
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod,
                    config: Some(config),
                    sandbox_config: Some(sandbox),
                })
                .await
                .map_err(call_failed("CreateContainer"))?
                .into_inner()
                .container_id;
            let create_ms = ms(t);
            let t = Instant::now();
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(call_failed("StartContainer"))?;
            serde_json::to_value(Started {
                id,
                create_ms,
                start_ms: ms(t),
            })?
        }
        Cmd::Exec {
            timeout,
            container,
            cmd,
        } => {
            let t = Instant::now();
            let r = c
                .exec_sync(cri::ExecSyncRequest {
                    container_id: container,
                    cmd,
                    timeout,
                })
                .await
                .map_err(call_failed("ExecSync"))?
                .into_inner();
            serde_json::to_value(Executed {
                exit_code: r.exit_code,
                stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                ms: ms(t),
            })?
        }
        Cmd::Ps { pod } => {
            let filter = pod.map(|pod_sandbox_id| cri::ContainerFilter {
                pod_sandbox_id,
                ..Default::default()
            });
            let r = c
                .list_containers(cri::ListContainersRequest { filter })
                .await
                .map_err(call_failed("ListContainers"))?
                .into_inner();
            let list: Vec<ContainerLine> = r
                .containers
                .into_iter()
                .map(|k| ContainerLine {
                    id: k.id,
                    name: k.metadata.map(|m| m.name).unwrap_or_default(),
                    pod: k.pod_sandbox_id,
                    state: container_state(k.state),
                    image: k.image.map(|i| i.image).unwrap_or_default(),
                })
                .collect();
            serde_json::to_value(list)?
        }
        Cmd::Stop { timeout, container } => {
            let t = Instant::now();
            c.stop_container(cri::StopContainerRequest {
                container_id: container.clone(),
                timeout,
            })
            .await
            .map_err(call_failed("StopContainer"))?;
            serde_json::to_value(Done {
                id: container,
                ms: ms(t),
            })?
        }
        Cmd::Rm { container } => {
            let t = Instant::now();
            c.remove_container(cri::RemoveContainerRequest {
                container_id: container.clone(),
            })
            .await
            .map_err(call_failed("RemoveContainer"))?;
            serde_json::to_value(Done {
                id: container,
                ms: ms(t),
            })?
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nestless-cri: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nestless-cri: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!(
            parse_port("80:8080"),
            Ok((80, 8080, cri::Protocol::Tcp as i32))
        );
        assert!(parse_port("80").is_err());
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        let a = Args::try_parse_from([
            "nestless-cri",
            "runp",
            "--name",
            "web",
            "--handler",
            "nestless",
            "--port",
            "80:8080",
        ])
        .unwrap();
        assert!(matches!(a.command, Cmd::Runp { ref handler, .. } if handler == "nestless"));
        let udp = cri::Protocol::Udp as i32;
        assert_eq!(parse_port("53:1053/udp"), Ok((53, 1053, udp)));
        assert_eq!(parse_port("80:8080/tcp"), parse_port("80:8080"));
        assert!(parse_port("80:8080/sctp")
            .unwrap_err()
            .contains("80:8080/sctp"));
        let a =
            Args::try_parse_from(["nestless-cri", "exec", "c1", "--", "ip", "-o", "addr"]).unwrap();
        assert!(matches!(a.command, Cmd::Exec { ref cmd, .. } if cmd.len() == 3));
        assert!(Args::try_parse_from(["nestless-cri", "rmp"]).is_err());
        assert!(Args::try_parse_from(["nestless-cri", "exec", "c1"]).is_err());
    }
}
