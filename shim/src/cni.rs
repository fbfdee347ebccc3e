//! `nestless-cni`: a CNI plugin (spec 1.1.0, also 0.3.x to 1.0.0) that gives
//! the pod sandbox its host-provided NIC in the Kubernetes/CRI path.
//!
//! containerd's CRI creates the pod's network namespace and runs CNI ADD
//! before it creates the sandbox container, and it reports the IP that CNI
//! returns (`PodSandboxStatus`, `crictl inspectp`). So the attach happens
//! here; the shim, called afterwards, finds the same NIC (the agent's attach
//! is idempotent per sandbox) already configured and does not attach another.
//!
//! | command | what it does |
//! |---|---|
//! | ADD | AttachNic(CNI_CONTAINERID), plug into CNI_NETNS as CNI_IFNAME, print the result |
//! | DEL | DetachNic(CNI_CONTAINERID); a NIC or netns already gone is success |
//! | CHECK | the NIC is leased and configured in the netns |
//! | STATUS | the agent answers Health |
//! | GC | detaches the VM's NICs whose sandbox is not in `cni.dev/valid-attachments` |
//! | VERSION | the versions above |
//!
//! The plugin's own keys in the network configuration: `shimConfig` (path of
//! the shim's TOML, default `/etc/nestless/shim.toml`, for the agent address
//! and timeouts) and `agent` (an address overriding it).

use std::{collections::HashMap, path::PathBuf};

use serde_json::{json, Value};

use crate::{
    agent_client::{AgentClient, ClientError, Nic},
    config::{AgentAddress, ShimConfig},
    podnet::{
        attach::{attach_and_plug, AttachRequest},
        guest::{self, NicSpec},
        PodNetError,
    },
};

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: its code (spec table) and message.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// CNI error code: 1 incompatible version, 4 invalid env, 6 decode,
    /// 7 invalid config, 11 try again later, 50 unavailable, 100+ ours.
    pub code: u32,
    /// What went wrong.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The error document the spec asks for on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details }).to_string()
    }
}

impl From<ClientError> for CniError {
    fn from(e: ClientError) -> CniError {
        let code = match &e {
            ClientError::AgentUnavailable { .. } => 11,
            _ => 100,
        };
        CniError::new(code, e.to_string())
    }
}

impl From<PodNetError> for CniError {
    fn from(e: PodNetError) -> CniError {
        match e {
            PodNetError::Client(e) => e.into(),
            other => CniError::new(100, other.to_string()),
        }
    }
}

/// The CNI environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`: the pod sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, split.
    pub args: HashMap<String, String>,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_env() -> CniEnv {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS")
                .split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn require(&self, name: &str, value: &str) -> Result<(), CniError> {
        if value.is_empty() {
            return Err(CniError::new(4, format!("{name} is not set")));
        }
        Ok(())
    }

    fn labels(&self) -> HashMap<String, String> {
        let mut l = HashMap::new();
        for (arg, label) in [
            ("K8S_POD_NAMESPACE", "io.kubernetes.pod.namespace"),
            ("K8S_POD_NAME", "io.kubernetes.pod.name"),
            ("K8S_POD_UID", "io.kubernetes.pod.uid"),
        ] {
            if let Some(v) = self.args.get(arg) {
                l.insert(label.to_string(), v.clone());
            }
        }
        l
    }
}

/// The parts of the network configuration this plugin reads.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// `cniVersion`.
    pub version: String,
    /// `name`.
    pub name: String,
    shim_config: Option<PathBuf>,
    agent: Option<String>,
    raw: Value,
}

impl NetConf {
    /// Parses stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(6, format!("network configuration is not JSON: {e}")))?;
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_string);
        let version = s("cniVersion")
            .ok_or_else(|| CniError::new(7, "network configuration has no cniVersion"))?;
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                1,
                format!(
                    "cniVersion {version:?} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        for key in ["shimConfig", "agent"] {
            if let Some(v) = raw.get(key) {
                if !v.is_string() {
                    return Err(CniError::new(
                        7,
                        format!("network configuration key {key:?} must be a string"),
                    ));
                }
            }
        }
        Ok(NetConf {
            version,
            name: s("name").unwrap_or_default(),
            shim_config: s("shimConfig").map(PathBuf::from),
            agent: s("agent"),
            raw,
        })
    }

    /// The shim configuration (agent address and timeouts) this plugin uses.
    pub fn shim_config(&self) -> Result<ShimConfig, CniError> {
        let mut cfg = ShimConfig::resolve(self.shim_config.as_deref())
            .map_err(|e| CniError::new(7, e.to_string()))?;
        if let Some(a) = &self.agent {
            cfg.agent.address = AgentAddress::parse(a)
                .map_err(|e| CniError::new(7, format!("key \"agent\": {e}")))?;
        }
        Ok(cfg)
    }
}

/// The CNI result for a configured NIC.
pub fn result_json(version: &str, nic: &Nic, ifname: &str, netns: &str) -> Value {
    let old = version.starts_with("0.");
    let ips: Vec<Value> = nic
        .addresses
        .iter()
        .map(|a| {
            let mut ip = json!({ "address": format!("{}/{}", a.ip, a.prefix_len), "interface": 0 });
            if let Some(gw) = a.gateway {
                ip["gateway"] = json!(gw.to_string());
            }
            if old {
                ip["version"] = json!(if a.ip.is_ipv6() { "6" } else { "4" });
            }
            ip
        })
        .collect();
    let routes: Vec<Value> = nic
        .routes
        .iter()
        .map(|r| {
            let mut v = json!({ "dst": format!("{}/{}", r.destination, r.prefix_len) });
            if let Some(gw) = r.gateway {
                v["gw"] = json!(gw.to_string());
            }
            v
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [{ "name": ifname, "mac": nic.mac.to_string(), "mtu": nic.mtu, "sandbox": netns }],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// Runs one CNI command; returns what goes to stdout.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    if env.command == "VERSION" {
        return Ok(
            json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string(),
        );
    }
    let conf = NetConf::parse(stdin)?;
    let cfg = conf.shim_config()?;
    match env.command.as_str() {
        "ADD" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_NETNS", &env.netns)?;
            env.require("CNI_IFNAME", &env.ifname)?;
            crate::config::InterfaceName::new(&env.ifname)
                .map_err(|e| CniError::new(4, format!("CNI_IFNAME: {e}")))?;
            let client = AgentClient::connect(&cfg.agent).await?;
            let nic = attach_and_plug(
                &client,
                &AttachRequest {
                    sandbox_id: &env.container_id,
                    labels: &env.labels(),
                    ifname: &env.ifname,
                    netns: std::path::Path::new(&env.netns),
                    nic_wait: cfg.network.nic_wait,
                },
            )
            .await?;
            Ok(result_json(&conf.version, &nic, &env.ifname, &env.netns).to_string())
        }
        "DEL" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            // The netns may be gone: the NIC is released by id all the same.
            let client = AgentClient::connect(&cfg.agent).await?;
            client.detach(&env.container_id).await?;
            Ok(String::new())
        }
        "CHECK" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_NETNS", &env.netns)?;
            let client = AgentClient::connect(&cfg.agent).await?;
            let nic = client
                .list()
                .await?
                .into_iter()
                .find(|n| n.sandbox_id == env.container_id)
                .ok_or_else(|| {
                    CniError::new(
                        100,
                        format!("sandbox {} has no host-provided NIC", env.container_id),
                    )
                })?
                .nic?;
            let spec = NicSpec::for_nic(&nic, &env.ifname);
            let netns = PathBuf::from(&env.netns);
            let ok = tokio::task::spawn_blocking(move || {
                guest::in_netns(&netns, move |h| async move {
                    guest::check_configured(&h, &spec).await
                })
            })
            .await
            .map_err(|e| CniError::new(100, e.to_string()))?
            .map_err(PodNetError::from)?;
            if !ok {
                return Err(CniError::new(
                    100,
                    format!(
                        "NIC {} ({}) is not configured as {} in {}",
                        nic.id, nic.mac, env.ifname, env.netns
                    ),
                ));
            }
            Ok(String::new())
        }
        "STATUS" => {
            let client = AgentClient::connect(&cfg.agent)
                .await
                .map_err(|e| CniError::new(50, e.to_string()))?;
            client
                .health()
                .await
                .map_err(|e| CniError::new(50, e.to_string()))?;
            Ok(String::new())
        }
        "GC" => {
            let valid: Vec<String> = conf
                .raw
                .get("cni.dev/valid-attachments")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v["containerID"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let client = AgentClient::connect(&cfg.agent).await?;
            for nic in client.list().await? {
                if !valid.contains(&nic.sandbox_id) {
                    log::info!("GC: releasing NIC {} of sandbox {}", nic.id, nic.sandbox_id);
                    client.detach(&nic.sandbox_id).await?;
                }
            }
            Ok(String::new())
        }
        other => Err(CniError::new(
            4,
            format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_client::{NicAddress, NicRoute};

    #[test]
    fn conf_errors_carry_spec_codes() {
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, 6);
        assert_eq!(NetConf::parse(b"{}").unwrap_err().code, 7);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("1.1.0"));
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","agent":5}"#)
                .unwrap_err()
                .code,
            7
        );
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agent":"unix:///run/a.sock"}"#)
                .unwrap();
        assert_eq!(c.name, "n");
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","agent":"tcp://x"}"#)
            .unwrap()
            .shim_config()
            .unwrap_err();
        assert!(e.msg.contains("\"agent\""), "{e}");
    }

    #[tokio::test]
    async fn version_and_env_errors() {
        let env = CniEnv {
            command: "VERSION".into(),
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&run(&env, b"").await.unwrap()).unwrap();
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
        let env = CniEnv {
            command: "ADD".into(),
            ..Default::default()
        };
        let conf = br#"{"cniVersion":"1.0.0","name":"n","agent":"unix:///nonexistent/x.sock"}"#;
        let e = run(&env, conf).await.unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_CONTAINERID is not set"));
        let env = CniEnv {
            command: "BOGUS".into(),
            ..Default::default()
        };
        assert_eq!(run(&env, conf).await.unwrap_err().code, 4);
    }

    #[test]
    fn result_shapes() {
        let nic = Nic {
            id: "0000000001".into(),
            sandbox_id: "sb".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            mtu: 1500,
            addresses: vec![NicAddress {
                ip: "10.0.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("10.0.0.1".parse().unwrap()),
            }],
            routes: vec![NicRoute {
                destination: "0.0.0.0".parse().unwrap(),
                prefix_len: 0,
                gateway: Some("10.0.0.1".parse().unwrap()),
            }],
        };
        let r = result_json("1.0.0", &nic, "eth0", "/var/run/netns/x");
        assert_eq!(r["ips"][0]["address"], "10.0.0.5/24");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["interfaces"][0]["sandbox"], "/var/run/netns/x");
        assert_eq!(r["routes"][0]["gw"], "10.0.0.1");
        assert_eq!(
            result_json("0.3.1", &nic, "eth0", "/x")["ips"][0]["version"],
            "4"
        );
    }
}
