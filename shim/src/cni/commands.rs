//! One function per CNI verb. ADD shares its attach with the shim
//! ([`crate::podnet::attach`]): ask the agent, plug the NIC into the pod
//! netns, detach it again on failure.
//!
//! ```text
//! ADD    AttachNic(CNI_CONTAINERID, CNI_IFNAME, label network=name) ─▶ NIC by MAC
//!          ─▶ CNI_NETNS as CNI_IFNAME ─▶ result {interfaces, ips, routes}
//! DEL    DetachNic(CNI_CONTAINERID, CNI_IFNAME)   (NOT_FOUND, a gone netns: success)
//! CHECK  ListNics: the (CNI_CONTAINERID, CNI_IFNAME) NIC ─▶ configured in CNI_NETNS?
//! STATUS Health
//! GC     ListNics ─▶ this network's NICs (label) not in cni.dev/valid-attachments
//!          ─▶ DetachNic(nic id) each
//! ```
//!
//! CNI attachments live in the agent's empty scope: CRI sandbox ids are unique
//! across containerd namespaces, and the shim finds a CRI sandbox's NIC there.

use std::path::Path;

use serde_json::{json, Value};

use super::{CniCode, CniEnv, CniError, NetConf, NETWORK_LABEL, SUPPORTED_VERSIONS};
use crate::{
    agent_client::{AgentClient, DetachTarget, Nic, SandboxRef},
    config::{InterfaceName, ShimConfig},
    podnet::{
        attach::{attach_and_plug, AttachRequest},
        guest::{self, NicSpec, NicState},
        PodNetError,
    },
};

/// VERSION: the versions this plugin speaks.
pub fn cmd_version() -> String {
    json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// The attachment an invocation is about: the sandbox (empty scope) and CNI_IFNAME.
fn attachment(env: &CniEnv) -> Result<(SandboxRef, String), CniError> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    InterfaceName::new(&env.ifname)
        .map_err(|e| CniError::new(CniCode::InvalidEnvironment, format!("CNI_IFNAME: {e}")))?;
    Ok((SandboxRef::unscoped(&env.container_id), env.ifname.clone()))
}

/// ADD: the attachment's NIC, plugged into the netns; prints the result.
pub async fn cmd_add(env: &CniEnv, conf: &NetConf, cfg: &ShimConfig) -> Result<String, CniError> {
    let (sandbox, ifname) = attachment(env)?;
    env.require("CNI_NETNS", &env.netns)?;
    let client = AgentClient::connect(&cfg.agent).await?;
    let attached = attach_and_plug(
        &client,
        &AttachRequest {
            sandbox: &sandbox,
            labels: &env.labels(&conf.name),
            ifname: &ifname,
            netns: Path::new(&env.netns),
            nic_wait: cfg.network.nic_wait,
            // The namespace is the runtime's and its CNI chain's (another
            // network may add its interface): only this interface is ours.
            exclusive: false,
        },
    )
    .await?;
    Ok(result_json(&conf.version, &attached.nic, &ifname, &env.netns).to_string())
}

/// DEL: releases the attachment's NIC (the sandbox's other interfaces stay);
/// the netns may be gone already.
pub async fn cmd_del(env: &CniEnv, cfg: &ShimConfig) -> Result<String, CniError> {
    let (sandbox, ifname) = attachment(env)?;
    let client = AgentClient::connect(&cfg.agent).await?;
    client
        .detach(DetachTarget::Interface(&sandbox, &ifname))
        .await?;
    Ok(String::new())
}

/// CHECK: the attachment has its NIC, configured in the netns as
/// CNI_IFNAME, every address usable (not tentative, not failed DAD).
pub async fn cmd_check(env: &CniEnv, conf: &NetConf, cfg: &ShimConfig) -> Result<String, CniError> {
    let (sandbox, ifname) = attachment(env)?;
    env.require("CNI_NETNS", &env.netns)?;
    let client = AgentClient::connect(&cfg.agent).await?;
    let listed = client
        .list()
        .await?
        .into_iter()
        .find(|n| n.sandbox == sandbox && n.interface == ifname)
        .ok_or_else(|| {
            CniError::new(
                CniCode::Internal,
                format!(
                    "sandbox {} has no host-provided NIC as {ifname} (network {})",
                    env.container_id, conf.name
                ),
            )
        })?;
    let nic = listed.nic?;
    let spec = NicSpec::for_nic(&nic, &ifname);
    let pod = guest::Netlink::open(Path::new(&env.netns)).map_err(PodNetError::from)?;
    let not = |why: String| {
        CniError::new(
            CniCode::Internal,
            format!(
                "NIC {} ({}) is not configured as {ifname} in {}: {why}",
                nic.id, nic.mac, env.netns
            ),
        )
    };
    match guest::check_configured(&pod, &spec)
        .await
        .map_err(PodNetError::from)?
    {
        NicState::Ready => Ok(String::new()),
        NicState::Missing => Err(not("it is not in the namespace".into())),
        NicState::Differs(why) => Err(not(why)),
        NicState::DadFailed(ip) => Err(CniError::new(
            CniCode::Internal,
            guest::GuestNetError::DadFailed {
                ifname: ifname.clone(),
                ip,
            }
            .to_string(),
        )),
    }
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

/// GC: releases this network's attachments that the runtime no longer
/// lists. Only NICs that ADD attached for this network (its label, the empty
/// scope) are candidates; a missing `cni.dev/valid-attachments` is an error.
pub async fn cmd_gc(conf: &NetConf, cfg: &ShimConfig) -> Result<String, CniError> {
    let valid = conf.valid_attachments()?;
    let client = AgentClient::connect(&cfg.agent).await?;
    for nic in client.list().await? {
        let ours = nic.sandbox.scope.is_empty()
            && nic.labels.get(NETWORK_LABEL).map(String::as_str) == Some(conf.name.as_str());
        let listed = valid
            .iter()
            .any(|(id, ifname)| *id == nic.sandbox.id && *ifname == nic.interface);
        if ours && !listed {
            log::info!(
                "GC of network {}: releasing NIC {} ({} of sandbox {})",
                conf.name,
                nic.id,
                nic.interface,
                nic.sandbox
            );
            client.detach(DetachTarget::Nic(&nic.id)).await?;
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
    use std::collections::HashMap;

    use super::*;
    use crate::{
        agent_client::{AttachArgs, NicAddress, NicRoute},
        fake_agent::FakeAgent,
    };

    fn cfg_for(agent: &FakeAgent) -> ShimConfig {
        ShimConfig {
            agent: agent.endpoint(),
            ..Default::default()
        }
    }

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(format!(r#"{{"cniVersion":"1.1.0","name":"nestless"{extra}}}"#).as_bytes())
            .unwrap()
    }

    /// Attaches a NIC in the fake directly (as ADD or the shim would).
    async fn attach(
        agent: &FakeAgent,
        scope: &str,
        id: &str,
        ifname: &str,
        network: Option<&str>,
    ) -> String {
        let client = AgentClient::connect(&agent.endpoint()).await.unwrap();
        let labels: HashMap<String, String> = network
            .map(|n| HashMap::from([(NETWORK_LABEL.to_owned(), n.to_owned())]))
            .unwrap_or_default();
        let sb = SandboxRef::new(scope, id);
        client
            .attach(&AttachArgs {
                sandbox: &sb,
                interface: ifname,
                labels: &labels,
            })
            .await
            .unwrap()
            .nic
            .id
    }

    #[tokio::test]
    async fn gc_releases_only_this_networks_unlisted_attachments() {
        let agent = FakeAgent::start().await;
        let cfg = cfg_for(&agent);
        let kept = attach(&agent, "", "sb1", "eth0", Some("nestless")).await;
        let other_net = attach(&agent, "", "sb1", "net1", Some("other")).await;
        let shims = attach(&agent, "default", "c1", "eth0", None).await;
        let stale = attach(&agent, "", "sb2", "eth0", Some("nestless")).await;
        let stale_if = attach(&agent, "", "sb1", "net2", Some("nestless")).await;
        agent.take_calls();

        // Without the list, or with the wrong key: an error, nothing released.
        for bad in [
            "",
            r#","cni.dev/attachments":[{"containerID":"sb1","ifname":"eth0"}]"#,
        ] {
            let e = cmd_gc(&conf(bad), &cfg).await.unwrap_err();
            assert_eq!(e.code, CniCode::InvalidNetworkConfig, "{e}");
        }
        assert!(agent.take_calls().is_empty());

        cmd_gc(
            &conf(r#","cni.dev/valid-attachments":[{"containerID":"sb1","ifname":"eth0"}]"#),
            &cfg,
        )
        .await
        .unwrap();
        let mut calls = agent.take_calls();
        calls.sort();
        let mut want = vec![
            "list".to_owned(),
            format!("detach nic {stale}"),
            format!("detach nic {stale_if}"),
        ];
        want.sort();
        assert_eq!(calls, want);
        let mut left: Vec<String> = agent.nics().into_iter().map(|n| n.3).collect();
        left.sort();
        let mut expect = vec![kept, other_net, shims];
        expect.sort();
        assert_eq!(left, expect);
    }

    #[tokio::test]
    async fn del_releases_its_interface_only() {
        let agent = FakeAgent::start().await;
        let cfg = cfg_for(&agent);
        let eth0 = attach(&agent, "", "pod-x", "eth0", Some("nestless")).await;
        attach(&agent, "", "pod-x", "net1", Some("nestless")).await;
        let env = CniEnv {
            command: "DEL".into(),
            container_id: "pod-x".into(),
            ifname: "net1".into(),
            ..Default::default()
        };
        cmd_del(&env, &cfg).await.unwrap();
        cmd_del(&env, &cfg).await.expect("DEL twice");
        let left: Vec<_> = agent.nics().into_iter().map(|n| (n.2, n.3)).collect();
        assert_eq!(left, [("eth0".to_owned(), eth0)]);
        let no_ifname = CniEnv {
            ifname: String::new(),
            ..env
        };
        assert_eq!(
            cmd_del(&no_ifname, &cfg).await.unwrap_err().code,
            CniCode::InvalidEnvironment
        );
    }

    #[test]
    fn result_shapes() {
        let nic = Nic {
            id: "0000000001".into(),
            sandbox_id: "sb".into(),
            scope: String::new(),
            interface: "eth0".into(),
            labels: Default::default(),
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
