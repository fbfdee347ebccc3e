//! A host agent for unit tests: the `NetAgent` ttrpc service on a unix
//! socket, keeping NICs in memory, recording every request.
//!
//! It keys NICs as the protocol says, by (scope, sandbox id, interface name),
//! and echoes both in each `Nic`; [`FakeAgent::legacy`] plays an agent that
//! predates the two fields (it keys by sandbox id alone and echoes them
//! empty), so that the guest's defence against such an agent is tested too.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use nestless_protos::{
    agent as pb,
    agent_ttrpc::{create_net_agent, NetAgent},
};
use ttrpc::r#async::TtrpcContext;

use crate::config::{AgentAddress, AgentEndpoint};

/// One NIC the fake holds: (scope, sandbox, interface) -> NIC.
type Key = (String, String, String);

#[derive(Default)]
struct State {
    nics: BTreeMap<Key, pb::Nic>,
    next: u32,
    calls: Vec<String>,
}

struct Service {
    state: Arc<Mutex<State>>,
    legacy: bool,
    network: String,
}

fn key_of(legacy: bool, scope: &str, sandbox: &str, interface: &str) -> Key {
    if legacy {
        (String::new(), sandbox.to_owned(), String::new())
    } else {
        let ifname = if interface.is_empty() {
            "eth0"
        } else {
            interface
        };
        (scope.to_owned(), sandbox.to_owned(), ifname.to_owned())
    }
}

#[async_trait]
impl NetAgent for Service {
    async fn attach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::AttachNicRequest,
    ) -> ttrpc::Result<pb::AttachNicResponse> {
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!(
            "attach {}/{}/{}",
            req.scope, req.sandbox_id, req.interface
        ));
        let key = key_of(self.legacy, &req.scope, &req.sandbox_id, &req.interface);
        if let Some(nic) = st.nics.get(&key) {
            return Ok(pb::AttachNicResponse {
                nic: Some(nic.clone()).into(),
                created: false,
                ..Default::default()
            });
        }
        st.next += 1;
        let n = st.next;
        let nic = pb::Nic {
            id: format!("{n:010x}"),
            sandbox_id: req.sandbox_id.clone(),
            network: self.network.clone(),
            mac: format!("02:00:00:00:00:{n:02x}"),
            addresses: vec![pb::IpConfig {
                address: format!("10.0.0.{}", n + 1),
                prefix_len: 24,
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            mtu: 1500,
            labels: req.labels.clone(),
            scope: key.0.clone(),
            interface: key.2.clone(),
            ..Default::default()
        };
        st.nics.insert(key, nic.clone());
        Ok(pb::AttachNicResponse {
            nic: Some(nic).into(),
            created: true,
            ..Default::default()
        })
    }

    async fn detach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::DetachNicRequest,
    ) -> ttrpc::Result<pb::DetachNicResponse> {
        let mut st = self.state.lock().unwrap();
        let before = st.nics.len();
        if !req.nic_id.is_empty() {
            st.calls.push(format!("detach nic {}", req.nic_id));
            st.nics.retain(|_, n| n.id != req.nic_id);
        } else {
            st.calls.push(format!(
                "detach {}/{}/{}",
                req.scope, req.sandbox_id, req.interface
            ));
            let legacy = self.legacy;
            st.nics.retain(|(scope, sb, ifname), _| {
                let same = if legacy {
                    *sb == req.sandbox_id
                } else {
                    *scope == req.scope
                        && *sb == req.sandbox_id
                        && (req.interface.is_empty() || *ifname == req.interface)
                };
                !same
            });
        }
        if st.nics.len() == before {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                "no such NIC",
            )));
        }
        Ok(pb::DetachNicResponse::default())
    }

    async fn list_nics(
        &self,
        _: &TtrpcContext,
        _: pb::ListNicsRequest,
    ) -> ttrpc::Result<pb::ListNicsResponse> {
        let mut st = self.state.lock().unwrap();
        st.calls.push("list".into());
        Ok(pb::ListNicsResponse {
            nics: st.nics.values().cloned().collect(),
            ..Default::default()
        })
    }

    async fn health(
        &self,
        _: &TtrpcContext,
        _: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        Ok(pb::HealthResponse {
            protocol_version: nestless_protos::PROTOCOL_VERSION.into(),
            ..Default::default()
        })
    }
}

/// A running fake agent.
pub struct FakeAgent {
    state: Arc<Mutex<State>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    /// A fake that keys NICs by (scope, sandbox, interface), as the protocol says.
    pub async fn start() -> FakeAgent {
        Self::start_with(false).await
    }

    /// A fake that predates `scope` and `interface`: keyed by sandbox alone.
    pub async fn legacy() -> FakeAgent {
        Self::start_with(true).await
    }

    async fn start_with(legacy: bool) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let state = Arc::new(Mutex::new(State::default()));
        let service = create_net_agent(Arc::new(Service {
            state: state.clone(),
            legacy,
            network: "n".into(),
        }));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        // ttrpc 0.9's shutdown panics once its listener has ended: the server
        // goes away with the test's runtime.
        std::mem::forget(server);
        FakeAgent {
            state,
            socket,
            _dir: dir,
        }
    }

    /// The endpoint a client dials.
    pub fn endpoint(&self) -> AgentEndpoint {
        let mut e = crate::config::ShimConfig::default().agent;
        e.address = AgentAddress::Unix(self.socket.clone());
        e
    }

    /// The requests so far (`attach scope/sandbox/interface`, `detach nic ID`,
    /// `detach scope/sandbox/interface`, `list`), and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    /// The NICs held: (scope, sandbox, interface, id).
    pub fn nics(&self) -> Vec<(String, String, String, String)> {
        self.state
            .lock()
            .unwrap()
            .nics
            .iter()
            .map(|((s, sb, i), n)| (s.clone(), sb.clone(), i.clone(), n.id.clone()))
            .collect()
    }
}
