//! Hostlo in the real-VM harness ([`crate::e2e`]): the parts of a Hostlo pod as CRI pod
//! sandboxes in the cluster's VMs, processes in a part's network namespace, and the agent's
//! view of the pod (`nestlessctl hostlo --json`).

use std::time::Duration;

use serde_json::Value;

use crate::e2e::Guest;
use crate::{
    containerd::{shell_quote, CRI_HANDLER},
    e2e::{eventually, Cluster, Node, Pod},
};

/// Creates part `part` of Hostlo pod `hostlo_pod` in `node` through CRI (runtime handler
/// `nestless`, the annotations as Kubernetes passes them), with a busybox container
/// running `script`.
pub fn start_part(node: &Node, hostlo_pod: &str, part: u32, script: &str) -> Pod {
    start_part_declaring(node, hostlo_pod, part, None, script)
}

/// [`start_part`], the part declaring `ports` (`io.nestless.hostlo/ports`, e.g. `8080/tcp`).
pub fn start_part_declaring(
    node: &Node,
    hostlo_pod: &str,
    part: u32,
    ports: Option<&str>,
    script: &str,
) -> Pod {
    let mut annotations = vec![
        format!("io.nestless.hostlo/pod={hostlo_pod}"),
        format!("io.nestless.hostlo/part={part}"),
    ];
    annotations.extend(ports.map(|p| format!("io.nestless.hostlo/ports={p}")));
    node.cri_pod_annotated(
        &format!("{hostlo_pod}-part-{part}"),
        CRI_HANDLER,
        &[],
        &annotations,
        script,
    )
    .0
}

/// Starts `command` (a guest program and its arguments) in the background in the network
/// namespace of `pod`, as one of its containers' processes; [`stop_in_pod`] with the same
/// `tag` stops it.
pub fn start_in_pod(node: &Node, pod: &Pod, tag: &str, command: &str) {
    node.sh(&format!(
        "nsenter -t {} -n setsid {command} </dev/null >/tmp/{tag}.log 2>&1 & echo $! > /tmp/{tag}.pid",
        pod.pid
    ));
}

/// Stops what [`start_in_pod`] started under `tag`.
pub fn stop_in_pod(node: &Node, tag: &str) {
    node.sh(&format!("kill $(cat /tmp/{tag}.pid)"));
}

/// Runs `command` in the network namespace of `pod`; its stdout, or its stderr.
pub fn in_pod(node: &Node, pod: &Pod, command: &str) -> Result<String, String> {
    let out = node
        .vm()
        .exec(&format!("nsenter -t {} -n {command}", pod.pid));
    if out.success() {
        Ok(out.stdout_str())
    } else {
        Err(format!("{command}: {}", out.stderr_str().trim()))
    }
}

/// `nestless-rr ping|ping-udp TARGET COUNT 64 WARMUP` in `pod`: its JSON figures.
pub fn rr(
    node: &Node,
    pod: &Pod,
    cmd: &str,
    target: &str,
    count: u32,
    warmup: u32,
) -> Result<Value, String> {
    let out = in_pod(
        node,
        pod,
        &format!("nestless-rr {cmd} {target} {count} 64 {warmup}"),
    )?;
    serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))
}

/// An HTTP/1.0 GET of `/` at `addr` (`IP:PORT`) from `pod`, with busybox nc (busybox-static's
/// wget crashes without glibc's NSS modules): the whole response.
pub fn http_get(node: &Node, pod: &Pod, addr: &str) -> Result<String, String> {
    let (ip, port) = addr.rsplit_once(':').expect("IP:PORT");
    let out = in_pod(
        node,
        pod,
        &format!(
            "sh -c {}",
            shell_quote(&format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 20 nc {ip} {port}"
            ))
        ),
    )?;
    if out.starts_with("HTTP/1.") {
        Ok(out)
    } else {
        Err(format!("no HTTP response from {addr}: {out:?}"))
    }
}

/// `nestlessctl hostlo --json`: the agent's view of the Hostlo pods.
pub fn view(c: &Cluster) -> Value {
    c.agent().hostlo()
}

/// Whether the first pod of `view` publishes `entry` (`PART:PORT/PROTO`).
pub fn has_port(view: &Value, entry: &str) -> bool {
    view[0]["ports"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p == entry))
}

/// Waits (up to `limit`) until the agent's view satisfies `f`; returns it.
pub fn wait_view(c: &Cluster, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(what, limit, || {
        let v = view(c);
        if f(&v) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
}
