//! The one attach routine of the guest side, shared by the shim's pod network
//! ([`super::agent::AgentNetwork`]) and `nestless-cni` ADD.
//!
//! ```text
//! caller                              host agent                      VM kernel
//!  AttachNic(scope, sandbox, ifname) ─▶ lease, tap, device_add ───────▶ ACPI hot-plug
//!  ◀──── Nic{mac, addresses, routes, mtu}, created
//!  wait for the link with the MAC ◀──────────────────────────────────── new ethN
//!  move into the pod netns as ifname, addresses, routes, up   (guest::plug_into_pod)
//!  a failure, and this call created the NIC: DetachNic(nic id) ─▶ unplug, lease freed
//! ```
//!
//! Attach is idempotent on the agent's side (same scope, sandbox and
//! interface name: same NIC): a retry, or the shim's setup after
//! `nestless-cni` ADD, gets the same NIC (`created = false`) and finds it
//! already in place. An undo gives back only what its own call created, by
//! the NIC's id: a NIC the sandbox already had belongs to whoever attached
//! it (CNI, an earlier call), and another interface of the same sandbox is
//! never touched.

use std::{collections::HashMap, path::Path, time::Duration};

use super::{
    guest::{self, GuestNetError, NicSpec},
    PodNetError,
};
use crate::agent_client::{
    AgentClient, AttachArgs, Attached, ClientError, DetachTarget, SandboxRef,
};

/// What to attach, and where.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest<'a> {
    /// The pod sandbox the NIC is for, in its scope.
    pub sandbox: &'a SandboxRef,
    /// Labels the agent keeps with the NIC.
    pub labels: &'a HashMap<String, String>,
    /// Name of the NIC inside the pod netns (the agent's interface key too).
    pub ifname: &'a str,
    /// The pod's network namespace.
    pub netns: &'a Path,
    /// How long to wait for the hot-plugged NIC to appear.
    pub nic_wait: Duration,
    /// Refuse a namespace that holds another network manager's interface
    /// ([`GuestNetError::NotOurs`]; see [`super::PodNetRequest::exclusive`]).
    pub exclusive: bool,
}

/// The guest step of an attach: put the NIC the agent described into the
/// pod, configured ([`GuestPlug`]: netlink in this VM; a fake in unit tests).
#[async_trait::async_trait]
pub trait Plug: Send + Sync {
    /// Plugs `spec` into the namespace at `netns`, waiting up to `wait` for it to appear;
    /// with `exclusive`, refuses a namespace that holds another manager's interface.
    async fn plug(
        &self,
        spec: &NicSpec,
        netns: &Path,
        wait: Duration,
        exclusive: bool,
    ) -> Result<(), GuestNetError>;
}

/// [`Plug`] through this VM's kernel ([`guest::plug_into_pod`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestPlug;

#[async_trait::async_trait]
impl Plug for GuestPlug {
    async fn plug(
        &self,
        spec: &NicSpec,
        netns: &Path,
        wait: Duration,
        exclusive: bool,
    ) -> Result<(), GuestNetError> {
        guest::plug_into_pod(spec, netns, wait, exclusive).await
    }
}

/// Asks the agent for the sandbox's NIC and plugs it into the pod netns,
/// configured. On failure, a NIC this call created is detached again before
/// the error is returned; a NIC the sandbox already had is left alone.
///
/// # Errors
/// [`PodNetError::Client`] when the agent refuses, cannot be reached or
/// replies with an unusable NIC, or one that is not the sandbox's;
/// [`PodNetError::Guest`] when the NIC does not appear or cannot be moved or
/// configured.
pub async fn attach_and_plug(
    client: &AgentClient,
    req: &AttachRequest<'_>,
) -> Result<Attached, PodNetError> {
    attach_and_plug_with(client, req, &GuestPlug).await
}

/// [`attach_and_plug`] with the guest step `plug`.
///
/// # Errors
/// As [`attach_and_plug`].
pub async fn attach_and_plug_with(
    client: &AgentClient,
    req: &AttachRequest<'_>,
    plug: &dyn Plug,
) -> Result<Attached, PodNetError> {
    let args = AttachArgs {
        sandbox: req.sandbox,
        interface: req.ifname,
        labels: req.labels,
    };
    let (failed, made): (PodNetError, Option<String>) = match client.attach(&args).await {
        Ok(attached) => {
            let spec = NicSpec::for_nic(&attached.nic, req.ifname);
            match plug
                .plug(&spec, req.netns, req.nic_wait, req.exclusive)
                .await
            {
                Ok(()) => return Ok(attached),
                Err(e) => (e.into(), attached.created.then(|| attached.nic.id.clone())),
            }
        }
        // Leased, but described so that it cannot be used: give it back if it is ours.
        Err(ClientError::BadNic {
            id,
            reason,
            created,
        }) => {
            let made = created.then(|| id.clone());
            (
                ClientError::BadNic {
                    id,
                    reason,
                    created,
                }
                .into(),
                made,
            )
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(id) = made {
        if let Err(undo) = client.detach(DetachTarget::Nic(&id)).await {
            log::error!(
                "sandbox {}: releasing NIC {id} after a failed attach failed: {undo}",
                req.sandbox
            );
        }
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::fake_agent::FakeAgent;

    /// A guest step that fails for the interfaces named in it.
    #[derive(Default)]
    struct FailingPlug(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl Plug for FailingPlug {
        async fn plug(
            &self,
            spec: &NicSpec,
            _netns: &Path,
            wait: Duration,
            _exclusive: bool,
        ) -> Result<(), GuestNetError> {
            if self.0.lock().unwrap().contains(&spec.ifname) {
                return Err(GuestNetError::NicNotFound {
                    mac: nestless_model::MacAddr(spec.mac).to_string(),
                    after: wait,
                });
            }
            Ok(())
        }
    }

    fn request<'a>(
        sandbox: &'a SandboxRef,
        ifname: &'a str,
        labels: &'a HashMap<String, String>,
    ) -> AttachRequest<'a> {
        AttachRequest {
            sandbox,
            labels,
            ifname,
            netns: Path::new("/nonexistent/netns"),
            nic_wait: Duration::from_millis(10),
            exclusive: false,
        }
    }

    #[tokio::test]
    async fn one_id_in_two_containerd_namespaces_is_two_sandboxes() {
        let agent = FakeAgent::start().await;
        let client = AgentClient::connect(&agent.endpoint()).await.unwrap();
        let labels = HashMap::new();
        let plug = FailingPlug::default();
        let one = SandboxRef::new("team-one", "app");
        let two = SandboxRef::new("team-two", "app");
        let a = attach_and_plug_with(&client, &request(&one, "eth0", &labels), &plug)
            .await
            .unwrap();
        let b = attach_and_plug_with(&client, &request(&two, "eth0", &labels), &plug)
            .await
            .unwrap();
        assert!(a.created && b.created);
        assert_ne!(a.nic.id, b.nic.id);
        assert_ne!(a.nic.mac, b.nic.mac);
        assert_eq!(
            agent.take_calls(),
            ["attach team-one/app/eth0", "attach team-two/app/eth0"]
        );
        // Tearing one down leaves the other.
        client.detach(DetachTarget::Sandbox(&two)).await.unwrap();
        let left: Vec<_> = agent.nics().into_iter().map(|n| n.3).collect();
        assert_eq!(left, [a.nic.id]);
    }

    #[tokio::test]
    async fn a_second_interface_is_a_second_nic_and_its_failure_leaves_the_first() {
        let agent = FakeAgent::start().await;
        let client = AgentClient::connect(&agent.endpoint()).await.unwrap();
        let labels = HashMap::new();
        let sb = SandboxRef::unscoped("pod-x");
        let ok = FailingPlug::default();
        let eth0 = attach_and_plug_with(&client, &request(&sb, "eth0", &labels), &ok)
            .await
            .unwrap();
        let net1 = attach_and_plug_with(&client, &request(&sb, "net1", &labels), &ok)
            .await
            .unwrap();
        assert_ne!(eth0.nic.id, net1.nic.id);
        assert_eq!(net1.nic.interface, "net1");
        // DEL of net1 only.
        client
            .detach(DetachTarget::Interface(&sb, "net1"))
            .await
            .unwrap();
        assert_eq!(agent.nics().len(), 1);
        agent.take_calls();

        // A failed net1 gives back the NIC it made, by id, and nothing else.
        let failing = FailingPlug(Mutex::new(vec!["net1".into()]));
        let e = attach_and_plug_with(&client, &request(&sb, "net1", &labels), &failing)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("appeared within"), "{e}");
        let calls = agent.take_calls();
        assert_eq!(calls[0], "attach /pod-x/net1");
        assert!(calls[1].starts_with("detach nic "), "{calls:?}");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            agent.nics(),
            [(
                String::new(),
                "pod-x".into(),
                "eth0".into(),
                eth0.nic.id.clone()
            )]
        );
    }

    #[tokio::test]
    async fn an_undo_never_releases_a_nic_it_did_not_create() {
        // The shim's setup after nestless-cni ADD: the NIC exists
        // (created = false); the guest step fails: the NIC stays.
        let agent = FakeAgent::start().await;
        let client = AgentClient::connect(&agent.endpoint()).await.unwrap();
        let labels = HashMap::new();
        let sb = SandboxRef::unscoped("pod-y");
        let first = attach_and_plug_with(
            &client,
            &request(&sb, "eth0", &labels),
            &FailingPlug::default(),
        )
        .await
        .unwrap();
        agent.take_calls();
        let failing = FailingPlug(Mutex::new(vec!["eth0".into()]));
        attach_and_plug_with(&client, &request(&sb, "eth0", &labels), &failing)
            .await
            .unwrap_err();
        assert_eq!(agent.take_calls(), ["attach /pod-y/eth0"]);
        assert_eq!(agent.nics()[0].3, first.nic.id);
    }

    /// A unix socket in front of `agent` that loses the reply to the first
    /// connection's first request (the agent restarting under it looks the
    /// same to the caller); later connections pass through.
    fn lossy_proxy(agent: &FakeAgent, dir: &Path) -> crate::config::AgentEndpoint {
        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::{UnixListener, UnixStream},
        };
        let crate::config::AgentAddress::Unix(upstream) = agent.endpoint().address else {
            unreachable!("the fake listens on a unix socket")
        };
        let path = dir.join("proxy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let agent = UnixStream::connect(&upstream).await.unwrap();
                let (mut c_in, mut c_out) = client.into_split();
                let (mut a_in, mut a_out) = agent.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut c_in, &mut a_out).await;
                });
                if std::mem::take(&mut first) {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = a_in.read(&mut buf).await;
                        let _ = c_out.shutdown().await;
                    });
                } else {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut a_in, &mut c_out).await;
                    });
                }
            }
        });
        let mut e = agent.endpoint();
        e.address = crate::config::AgentAddress::Unix(path);
        e
    }

    #[tokio::test]
    async fn a_nic_whose_reply_was_lost_is_given_back_when_the_plug_fails() {
        // The first attempt made the NIC, its reply was lost; the retry hears
        // "already there" (created = false). It is this call's all the same.
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let client = AgentClient::connect(&lossy_proxy(&agent, dir.path()))
            .await
            .unwrap();
        let labels = HashMap::new();
        let sb = SandboxRef::new("default", "lossy");
        let failing = FailingPlug(Mutex::new(vec!["eth0".into()]));
        attach_and_plug_with(&client, &request(&sb, "eth0", &labels), &failing)
            .await
            .unwrap_err();
        let calls = agent.take_calls();
        assert_eq!(
            calls[..2],
            ["attach default/lossy/eth0", "attach default/lossy/eth0"]
        );
        assert!(calls[2].starts_with("detach nic "), "{calls:?}");
        assert!(
            agent.nics().is_empty(),
            "the NIC outlived the failed attach"
        );
    }

    #[tokio::test]
    async fn an_agent_that_ignores_scope_and_interface_is_refused_untouched() {
        // An agent keyed by sandbox id alone answers team-two/app with
        // team-one/app's NIC, and net1 with eth0's: refused, nothing released.
        let agent = FakeAgent::legacy().await;
        let client = AgentClient::connect(&agent.endpoint()).await.unwrap();
        let labels = HashMap::new();
        let ok = FailingPlug::default();
        let one = SandboxRef::new("team-one", "app");
        attach_and_plug_with(&client, &request(&one, "eth0", &labels), &ok)
            .await
            .expect("a NIC the call created is used, whatever the echo");
        agent.take_calls();
        let two = SandboxRef::new("team-two", "app");
        let e = attach_and_plug_with(&client, &request(&two, "eth0", &labels), &ok)
            .await
            .unwrap_err();
        assert!(
            matches!(e, PodNetError::Client(ClientError::NotOurs { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("team-two/app"), "{e}");
        assert_eq!(e.code(), ttrpc::Code::ALREADY_EXISTS);
        let e = attach_and_plug_with(&client, &request(&one, "net1", &labels), &ok)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("which is eth0 of sandbox app"),
            "{e}"
        );
        assert_eq!(
            agent.take_calls(),
            ["attach team-two/app/eth0", "attach team-one/app/net1"]
        );
        assert_eq!(agent.nics().len(), 1);
    }
}
