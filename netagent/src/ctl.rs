//! `nestlessctl`'s agent commands: ask the admin socket, print a table or JSON.

use std::path::Path;

use nestless_protos::{agent as pb, agent_ttrpc::AdminClient};
use serde_json::{json, Value};

/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/nestless/admin.sock";

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Agent status.
    Status,
    /// VMs.
    Vms,
    /// NICs (of one VM or all).
    Nics,
    /// Leases.
    Leases,
    /// Hostlo pods.
    Hostlo,
}

/// Connects to the admin socket.
pub async fn connect(socket: &Path) -> anyhow::Result<AdminClient> {
    if !socket.exists() {
        anyhow::bail!(
            "admin socket {} does not exist (is nestless-netagent running?)",
            socket.display()
        );
    }
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to admin socket {}: {e}", socket.display()))?;
    Ok(AdminClient::new(client))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

fn rpc_err(what: &str, e: ttrpc::Error) -> anyhow::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => anyhow::anyhow!("{what}: {}", s.message()),
        other => anyhow::anyhow!("{what}: {other}"),
    }
}

/// Every NIC (of VM `vm`, every VM's when empty), page after page (a NIC
/// added or removed meanwhile neither makes another skipped nor repeated).
pub async fn all_nics(client: &AdminClient, vm: &str) -> anyhow::Result<Vec<pb::NicRecord>> {
    let mut nics = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListAllNicsRequest {
            vm: vm.to_string(),
            page_token,
            ..Default::default()
        };
        let r = client
            .list_all_nics(ctx(), &req)
            .await
            .map_err(|e| rpc_err("ListAllNics", e))?;
        nics.extend(r.nics);
        if r.next_page_token.is_empty() {
            return Ok(nics);
        }
        page_token = r.next_page_token;
    }
}

/// Fetches a view as JSON.
pub async fn fetch(client: &AdminClient, view: View, vm: Option<&str>) -> anyhow::Result<Value> {
    Ok(match view {
        View::Status => {
            let s = client
                .status(ctx(), &pb::StatusRequest::default())
                .await
                .map_err(|e| rpc_err("Status", e))?;
            json!({
                "agent_version": s.agent_version, "protocol_version": s.protocol_version,
                "uptime_seconds": s.uptime_seconds, "state_file": s.state_file,
                "vms": s.vms, "nics": s.nics,
            })
        }
        View::Vms => {
            let r = client
                .list_vms(ctx(), &pb::ListVmsRequest::default())
                .await
                .map_err(|e| rpc_err("ListVms", e))?;
            Value::Array(
                r.vms
                    .iter()
                    .map(|v| {
                        json!({
                            "name": v.name, "backend": v.backend, "endpoint": v.endpoint, "network": v.network,
                            "cid": v.cid, "unix_socket": v.unix_socket, "nics": v.nics, "max_nics": v.max_nics,
                            "status": v.status,
                        })
                    })
                    .collect(),
            )
        }
        View::Nics => {
            let nics = all_nics(client, vm.unwrap_or_default()).await?;
            Value::Array(
                nics.iter()
                    .map(|n| {
                        let nic = n.nic.as_ref().cloned().unwrap_or_default();
                        json!({
                            "vm": n.vm, "id": nic.id, "scope": nic.scope, "sandbox_id": nic.sandbox_id,
                            "interface": nic.interface, "state": n.state,
                            "mac": nic.mac, "addresses": nic.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect::<Vec<_>>(),
                            "network": nic.network, "host_ifname": n.host_ifname, "slot": n.slot,
                            "created_unix": n.created_unix,
                        })
                    })
                    .collect(),
            )
        }
        View::Hostlo => {
            let r = client
                .list_hostlo_pods(ctx(), &pb::ListHostloPodsRequest::default())
                .await
                .map_err(|e| rpc_err("ListHostloPods", e))?;
            Value::Array(
                r.pods
                    .iter()
                    .map(|p| {
                        let v = p.view.as_ref().cloned().unwrap_or_default();
                        let ports: Vec<String> = v
                            .parts
                            .iter()
                            .flat_map(|part| part.ports.iter().map(move |q| format!("{}:{}/{}", part.part, q.port, q.protocol)))
                            .collect();
                        json!({
                            "pod": p.pod, "network": p.network, "bridge": p.bridge, "members": p.members,
                            "pod_ip": v.pod_ip, "ports": ports,
                            "conflicts": v.conflicts.iter().map(|c| format!("{}/{}", c.port.port, c.port.protocol)).collect::<Vec<_>>(),
                            "conflicting_parts": v.conflicts.iter().map(|c| (format!("{}/{}", c.port.port, c.port.protocol), json!(c.parts))).collect::<serde_json::Map<_, _>>(),
                            "version": v.version,
                        })
                    })
                    .collect(),
            )
        }
        View::Leases => {
            let r = client
                .list_leases(ctx(), &pb::ListLeasesRequest::default())
                .await
                .map_err(|e| rpc_err("ListLeases", e))?;
            Value::Array(
                r.leases
                    .iter()
                    .map(|l| json!({
                        "network": l.network, "address": l.address, "vm": l.vm, "nic_id": l.nic_id,
                        "scope": l.scope, "sandbox_id": l.sandbox_id, "interface": l.interface,
                    }))
                    .collect(),
            )
        }
    })
}

/// Renders a view as an aligned text table.
pub fn table(view: View, v: &Value) -> String {
    let cols: &[&str] = match view {
        View::Status => {
            let obj = v.as_object().cloned().unwrap_or_default();
            return obj
                .iter()
                .map(|(k, v)| format!("{k:<18}{}\n", cell(v)))
                .collect();
        }
        View::Vms => &[
            "name", "backend", "network", "cid", "nics", "max_nics", "endpoint", "status",
        ],
        View::Nics => &[
            "vm",
            "id",
            "scope",
            "sandbox_id",
            "interface",
            "state",
            "mac",
            "addresses",
            "host_ifname",
            "slot",
        ],
        View::Leases => &[
            "network",
            "address",
            "vm",
            "nic_id",
            "scope",
            "sandbox_id",
            "interface",
        ],
        View::Hostlo => &[
            "pod",
            "network",
            "bridge",
            "members",
            "pod_ip",
            "ports",
            "conflicts",
        ],
    };
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_show_dashes() {
        let v = json!([
            {"network": "default", "address": "10.0.0.2", "vm": "vm1", "nic_id": "0000000001",
             "scope": "", "sandbox_id": "", "interface": "eth0"},
            {"network": "default", "address": "10.0.0.10", "vm": "vm-long", "nic_id": "0000000002",
             "scope": "team-one", "sandbox_id": "sb", "interface": "net1"}
        ]);
        let t = table(View::Leases, &v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NETWORK  ADDRESS    VM       NIC_ID      SCOPE     SANDBOX_ID  INTERFACE"
        );
        assert_eq!(
            lines[1],
            "default  10.0.0.2   vm1      0000000001  -         -           eth0"
        );
        assert_eq!(
            lines[2],
            "default  10.0.0.10  vm-long  0000000002  team-one  sb          net1"
        );
    }
}
