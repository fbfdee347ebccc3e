//! One function per CNI verb. ADD shares its attach with the shim
//! ([`crate::podnet::attach`]): ask the agent, plug the NIC into the pod
//! netns, detach it again on failure.
//!
//! ```text
//! ADD    AttachNic ─▶ NIC by MAC ─▶ CNI_NETNS as CNI_IFNAME ─▶ result {interfaces, ips, routes}
//! DEL    DetachNic(CNI_CONTAINERID)            (NOT_FOUND, a gone netns: success)
//! CHECK  ListNics: the sandbox's NIC ─▶ configured in CNI_NETNS?
//! STATUS Health
//! GC     ListNics ─▶ DetachNic for each sandbox not in cni.dev/valid-attachments
//! ```

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{CniCode, CniEnv, CniError, NetConf, SUPPORTED_VERSIONS};
use crate::{
    agent_client::{AgentClient, Nic},
    config::{InterfaceName, ShimConfig},
    podnet::{
        attach::{attach_and_plug, AttachRequest},
        guest::{self, NicSpec},
        PodNetError,
    },
};

/// VERSION: the versions this plugin speaks.
pub fn cmd_version() -> String {
    json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// ADD: the sandbox's NIC, plugged into the netns; prints the result.
pub async fn cmd_add(env: &CniEnv, conf: &NetConf, cfg: &ShimConfig) -> Result<String, CniError> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_NETNS", &env.netns)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    InterfaceName::new(&env.ifname)
        .map_err(|e| CniError::new(CniCode::InvalidEnvironment, format!("CNI_IFNAME: {e}")))?;
    let client = AgentClient::connect(&cfg.agent).await?;
    let nic = attach_and_plug(
        &client,
        &AttachRequest {
            sandbox_id: &env.container_id,
            labels: &env.labels(),
            ifname: &env.ifname,
            netns: Path::new(&env.netns),
            nic_wait: cfg.network.nic_wait,
        },
    )
    .await?;
    Ok(result_json(&conf.version, &nic, &env.ifname, &env.netns).to_string())
}

/// DEL: releases the sandbox's NIC; the netns may be gone already.
pub async fn cmd_del(env: &CniEnv, cfg: &ShimConfig) -> Result<String, CniError> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    let client = AgentClient::connect(&cfg.agent).await?;
    client.detach(&env.container_id).await?;
    Ok(String::new())
}

/// CHECK: the sandbox has its NIC, configured in the netns as CNI_IFNAME.
pub async fn cmd_check(env: &CniEnv, cfg: &ShimConfig) -> Result<String, CniError> {
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
                CniCode::Internal,
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
    .map_err(|e| CniError::new(CniCode::Internal, e.to_string()))?
    .map_err(PodNetError::from)?;
    if !ok {
        return Err(CniError::new(
            CniCode::Internal,
            format!(
                "NIC {} ({}) is not configured as {} in {}",
                nic.id, nic.mac, env.ifname, env.netns
            ),
        ));
    }
    Ok(String::new())
}

/// STATUS: whether the agent answers (else the plugin is not available).
pub async fn cmd_status(cfg: &ShimConfig) -> Result<String, CniError> {
    let unavailable =
        |e: &dyn std::fmt::Display| CniError::new(CniCode::PluginNotAvailable, e.to_string());
    let client = AgentClient::connect(&cfg.agent)
        .await
        .map_err(|e| unavailable(&e))?;
    client.health().await.map_err(|e| unavailable(&e))?;
    Ok(String::new())
}

/// GC: releases the NICs of sandboxes the runtime no longer knows.
pub async fn cmd_gc(conf: &NetConf, cfg: &ShimConfig) -> Result<String, CniError> {
    let valid = conf.valid_attachments();
    let client = AgentClient::connect(&cfg.agent).await?;
    for nic in client.list().await? {
        if !valid.contains(&nic.sandbox_id) {
            log::info!("GC: releasing NIC {} of sandbox {}", nic.id, nic.sandbox_id);
            client.detach(&nic.sandbox_id).await?;
        }
    }
    Ok(String::new())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_client::{NicAddress, NicRoute};

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
