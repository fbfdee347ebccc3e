//! `nestlessctl`'s agent commands: ask the admin socket, print a table or
//! JSON; `nestlessctl vm add|set|rm|ls` change the VMs registered at run
//! time ([`VmCommand`]).

use std::path::{Path, PathBuf};

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
                "vms": s.vms, "nics": s.nics, "registered_vms": s.registered_vms,
                "config_file": s.config_file, "config_generation": s.config_generation,
                "last_reload_error": s.last_reload_error,
            })
        }
        View::Vms => {
            let r = client
                .list_vms(ctx(), &pb::ListVmsRequest::default())
                .await
                .map_err(|e| rpc_err("ListVms", e))?;
            Value::Array(r.vms.iter().map(vm_json).collect())
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
            "name",
            "source",
            "backend",
            "network",
            "cid",
            "nics",
            "max_nics",
            "warm_pool",
            "endpoint",
            "unix_socket",
            "status",
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

/// A VM of a reply as JSON.
fn vm_json(v: &pb::VmInfo) -> Value {
    json!({
        "name": v.name, "backend": v.backend, "endpoint": v.endpoint, "network": v.network,
        "cid": v.cid, "unix_socket": v.unix_socket, "nics": v.nics, "max_nics": v.max_nics,
        "warm_pool": v.warm_pool, "status": v.status, "registered": v.registered,
        "source": if v.registered { "registered" } else { "file" },
    })
}

/// The fields of `nestlessctl vm add` and `vm set`: the keys of a `[[vm]]`
/// entry. The agent checks them as it checks the file, naming the field.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct VmFields {
    /// "qemu", "netns" or "libvirt" (required by `add`).
    #[arg(long, value_parser = ["qemu", "netns", "libvirt"])]
    pub backend: Option<String>,
    /// The VM's network (default: the only one).
    #[arg(long)]
    pub network: Option<String>,
    /// vsock CID the VM calls from.
    #[arg(long)]
    pub cid: Option<u32>,
    /// vhost-device-vsock socket (the agent listens on <path>_<port>).
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// Unix socket the agent listens on for this VM.
    #[arg(long)]
    pub vm_socket: Option<PathBuf>,
    /// At most this many NICs at once.
    #[arg(long)]
    pub max_nics: Option<u32>,
    /// NICs kept plugged and unassigned.
    #[arg(long)]
    pub warm_pool: Option<u32>,
    /// The VM's QMP socket (qemu).
    #[arg(long)]
    pub qmp_socket: Option<PathBuf>,
    /// A hot-plug bus (qemu; repeat for more).
    #[arg(long = "hotplug-slot")]
    pub hotplug_slots: Vec<String>,
    /// Network namespace: a name under /run/netns or a path (netns).
    #[arg(long)]
    pub netns: Option<String>,
    /// The libvirt domain's name (libvirt; default: the VM's name).
    #[arg(long)]
    pub domain: Option<String>,
    /// The libvirt connection URI (libvirt; default: the agent's
    /// `libvirt_uri`).
    #[arg(long)]
    pub libvirt_uri: Option<String>,
    /// Also put NICs in the domain's persistent definition (libvirt):
    /// `--persist-nics` or `--persist-nics=false`.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub persist_nics: Option<bool>,
}

impl VmFields {
    /// `spec` with the fields given here changed.
    fn apply(&self, spec: &mut pb::VmSpec) {
        let path = |p: &PathBuf| p.display().to_string();
        if let Some(b) = &self.backend {
            spec.backend = b.clone();
        }
        if let Some(n) = &self.network {
            spec.network = n.clone();
        }
        if let Some(c) = self.cid {
            spec.cid = c;
        }
        if let Some(p) = &self.vsock_uds {
            spec.vsock_uds = path(p);
        }
        if let Some(p) = &self.vm_socket {
            spec.socket = path(p);
        }
        if let Some(n) = self.max_nics {
            spec.max_nics = n;
        }
        if let Some(n) = self.warm_pool {
            spec.warm_pool = n;
        }
        if let Some(p) = &self.qmp_socket {
            spec.qmp_socket = path(p);
        }
        if !self.hotplug_slots.is_empty() {
            spec.hotplug_slots = self.hotplug_slots.clone();
        }
        if let Some(n) = &self.netns {
            spec.netns = n.clone();
        }
        if let Some(d) = &self.domain {
            spec.domain = d.clone();
        }
        if let Some(u) = &self.libvirt_uri {
            spec.libvirt_uri = u.clone();
        }
        if let Some(p) = self.persist_nics {
            spec.persist_nics = p;
        }
    }

    fn is_empty(&self) -> bool {
        self.backend.is_none()
            && self.network.is_none()
            && self.cid.is_none()
            && self.vsock_uds.is_none()
            && self.vm_socket.is_none()
            && self.max_nics.is_none()
            && self.warm_pool.is_none()
            && self.qmp_socket.is_none()
            && self.hotplug_slots.is_empty()
            && self.netns.is_none()
            && self.domain.is_none()
            && self.libvirt_uri.is_none()
            && self.persist_nics.is_none()
    }
}

/// `nestlessctl vm ...`: the VMs registered at run time.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum VmCommand {
    /// Register a VM and serve it at once (kept across agent restarts).
    Add {
        /// The VM's name.
        name: String,
        /// Its fields.
        #[command(flatten)]
        fields: VmFields,
    },
    /// Change a registered VM: max_nics and warm_pool change live; other
    /// fields restart its serving and are refused while it has NICs.
    Set {
        /// The VM's name.
        name: String,
        /// The fields to change.
        #[command(flatten)]
        fields: VmFields,
    },
    /// Unregister a VM: refused while it has NICs, unless --force.
    Rm {
        /// The VM's name.
        name: String,
        /// Release its NICs first (unplugged, leases freed).
        #[arg(long)]
        force: bool,
    },
    /// The VMs served: from the file and registered.
    Ls,
}

/// Runs a `vm` command: its result as JSON (`ls`: [`View::Vms`]'s rows),
/// and a line for people.
///
/// # Errors
/// Bad arguments, and the agent's refusals with its message.
pub async fn vm_command(client: &AdminClient, cmd: &VmCommand) -> anyhow::Result<(Value, String)> {
    match cmd {
        VmCommand::Ls => {
            let v = fetch(client, View::Vms, None).await?;
            let t = table(View::Vms, &v);
            Ok((v, t))
        }
        VmCommand::Add { name, fields } => {
            if fields.backend.is_none() {
                anyhow::bail!("vm add {name}: --backend is required (qemu, netns or libvirt)");
            }
            let mut spec = pb::VmSpec {
                name: name.clone(),
                ..Default::default()
            };
            fields.apply(&mut spec);
            let r = client
                .register_vm(
                    ctx(),
                    &pb::RegisterVmRequest {
                        vm: Some(spec).into(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| rpc_err(&format!("vm add {name}"), e))?;
            let v = vm_json(r.vm.as_ref().unwrap_or(&pb::VmInfo::default()));
            Ok((v, format!("VM {name} registered and served\n")))
        }
        VmCommand::Set { name, fields } => {
            if fields.is_empty() {
                anyhow::bail!(
                    "vm set {name}: nothing to change (give --max-nics, --warm-pool, ...)"
                );
            }
            let vms = client
                .list_vms(ctx(), &pb::ListVmsRequest::default())
                .await
                .map_err(|e| rpc_err("ListVms", e))?;
            let Some(info) = vms.vms.iter().find(|v| &v.name == name) else {
                anyhow::bail!("vm set {name}: the agent serves no VM of that name");
            };
            if !info.registered {
                anyhow::bail!(
                    "vm set {name}: it is a [[vm]] of the agent's configuration file: change it there and reload (systemctl reload nestless-netagent)"
                );
            }
            let mut spec = info.spec.as_ref().cloned().unwrap_or_default();
            fields.apply(&mut spec);
            let r = client
                .update_vm(
                    ctx(),
                    &pb::UpdateVmRequest {
                        vm: Some(spec).into(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| rpc_err(&format!("vm set {name}"), e))?;
            let v = vm_json(r.vm.as_ref().unwrap_or(&pb::VmInfo::default()));
            let how = if r.restarted {
                "updated (its serving restarted)"
            } else {
                "updated live"
            };
            Ok((v, format!("VM {name} {how}\n")))
        }
        VmCommand::Rm { name, force } => {
            let r = client
                .unregister_vm(
                    ctx(),
                    &pb::UnregisterVmRequest {
                        name: name.clone(),
                        force: *force,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| rpc_err(&format!("vm rm {name}"), e))?;
            Ok((
                json!({"name": name, "released_nics": r.released_nics}),
                format!(
                    "VM {name} unregistered ({} NIC(s) released)\n",
                    r.released_nics
                ),
            ))
        }
    }
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
    fn vm_flags_change_only_what_they_give() {
        let mut spec = pb::VmSpec {
            name: "a".into(),
            backend: "netns".into(),
            netns: "x".into(),
            socket: "/run/a.sock".into(),
            max_nics: 4,
            ..Default::default()
        };
        let flags = VmFields {
            max_nics: Some(8),
            warm_pool: Some(2),
            ..Default::default()
        };
        assert!(!flags.is_empty() && VmFields::default().is_empty());
        flags.apply(&mut spec);
        assert_eq!((spec.max_nics, spec.warm_pool), (8, 2));
        assert_eq!(
            (spec.netns.as_str(), spec.socket.as_str()),
            ("x", "/run/a.sock")
        );
        let flags = VmFields {
            vm_socket: Some("/run/b.sock".into()),
            hotplug_slots: vec!["rp1".into()],
            ..Default::default()
        };
        flags.apply(&mut spec);
        assert_eq!(spec.socket, "/run/b.sock");
        assert_eq!(spec.hotplug_slots, ["rp1"]);
        assert_eq!(spec.max_nics, 8);
    }

    #[test]
    fn libvirt_flags_parse_and_apply() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            f: VmFields,
        }
        let parse = |args: &[&str]| T::try_parse_from([&["t"], args].concat()).map(|t| t.f);
        let f = parse(&[
            "--backend",
            "libvirt",
            "--domain",
            "web 1",
            "--persist-nics",
        ])
        .unwrap();
        assert_eq!(
            (f.backend.as_deref(), f.domain.as_deref(), f.persist_nics),
            (Some("libvirt"), Some("web 1"), Some(true))
        );
        let mut spec = pb::VmSpec::default();
        f.apply(&mut spec);
        assert_eq!((spec.domain.as_str(), spec.persist_nics), ("web 1", true));
        let f = parse(&["--persist-nics=false", "--libvirt-uri", "qemu:///session"]).unwrap();
        assert!(!f.is_empty());
        f.apply(&mut spec);
        assert_eq!(
            (spec.persist_nics, spec.libvirt_uri.as_str()),
            (false, "qemu:///session")
        );
        assert!(parse(&["--persist-nics=maybe"]).is_err());
        assert!(parse(&["--backend", "xen"]).is_err());
    }

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
