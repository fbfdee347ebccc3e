//! `nestless-cni`: a CNI plugin (spec 1.1.0, also 0.3.x to 1.0.0) that gives
//! the pod sandbox its host-provided NIC in the Kubernetes/CRI path.
//!
//! containerd's CRI creates the pod's network namespace and runs CNI ADD
//! before it creates the sandbox container, and it reports the IP that CNI
//! returns (`PodSandboxStatus`, `crictl inspectp`). So the attach happens
//! here; the shim, called afterwards, finds the same NIC (the agent's attach
//! is idempotent per sandbox) already configured and does not attach another.
//!
//! | command | what it does ([`commands`]) |
//! |---|---|
//! | ADD | AttachNic(CNI_CONTAINERID, CNI_IFNAME), plug into CNI_NETNS as CNI_IFNAME, print the result |
//! | DEL | DetachNic(CNI_CONTAINERID, CNI_IFNAME); a NIC or netns already gone is success |
//! | CHECK | the CNI_IFNAME NIC is leased, configured in the netns, its addresses usable |
//! | STATUS | the agent answers Health |
//! | GC | detaches this network's attachments that `cni.dev/valid-attachments` does not list |
//! | VERSION | the versions above |
//!
//! An attachment is (CNI_CONTAINERID, CNI_IFNAME), as the spec has it: a pod
//! on two networks (Multus, nerdctl with two `--network`s) gets two NICs, and
//! DEL or CHECK of one never touches the other. Every NIC that ADD attaches
//! carries the label [`NETWORK_LABEL`] = the network's `name`: GC releases only
//! NICs with its own network's label, never those of another network using
//! this plugin, nor those the shim attached outside CNI (`ctr run`).
//!
//! ```text
//! containerd (CRI) ── env CNI_* + netconf on stdin ──▶ main ─▶ run: one function per verb
//!                  ◀── result (stdout), or the error document {code, msg} + exit 1
//! ```
//!
//! Errors carry the spec's named codes ([`CniCode`]); a refusal of the host
//! agent is mapped from its ttrpc code ([`CniCode::for_agent`]).
//!
//! The plugin's own keys in the network configuration: `shimConfig` (path of
//! the shim's TOML, default `/etc/nestless/shim.toml`, for the agent address
//! and timeouts) and `agent` (an address overriding it).

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use serde_json::{json, Value};

use crate::{
    agent_client::ClientError,
    config::{AgentAddress, ShimConfig},
    podnet::PodNetError,
};

pub mod commands;

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The label every NIC attached by ADD carries: the CNI network's `name`.
pub const NETWORK_LABEL: &str = "io.nestless.cni/network";

/// The version of the error document when the configuration names none.
const DEFAULT_VERSION: &str = "1.1.0";

/// The error codes of the CNI spec ("Error codes"), and the plugin's own
/// (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CniCode {
    /// 1: the configuration's `cniVersion` is not supported.
    IncompatibleVersion,
    /// 4: a `CNI_*` environment variable is missing or wrong.
    InvalidEnvironment,
    /// 6: the network configuration cannot be decoded.
    DecodingFailure,
    /// 7: the network configuration is invalid.
    InvalidNetworkConfig,
    /// 11: a transient failure; the runtime should try again later.
    TryAgainLater,
    /// 50: the plugin cannot serve ADD now (STATUS).
    PluginNotAvailable,
    /// 100: any other failure of this plugin.
    Internal,
    /// 101 (ours): the host agent has no NIC to give (the VM's `max_nics`,
    /// the subnet, or its hot-plug slots are used up).
    ResourceExhausted,
    /// 102 (ours): the host agent does not serve this VM this network.
    PermissionDenied,
}

impl CniCode {
    /// The number the error document carries.
    pub fn number(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::InvalidEnvironment => 4,
            Self::DecodingFailure => 6,
            Self::InvalidNetworkConfig => 7,
            Self::TryAgainLater => 11,
            Self::PluginNotAvailable => 50,
            Self::Internal => 100,
            Self::ResourceExhausted => 101,
            Self::PermissionDenied => 102,
        }
    }

    /// The code for a failed call to the host agent, from its ttrpc code:
    /// what may clear by itself (the agent or its hypervisor unreachable, a
    /// deadline) is "try again later"; no resources and no permission have
    /// codes of their own; anything else is ours.
    pub fn for_agent(code: ttrpc::Code) -> CniCode {
        match code {
            ttrpc::Code::UNAVAILABLE | ttrpc::Code::DEADLINE_EXCEEDED => Self::TryAgainLater,
            ttrpc::Code::RESOURCE_EXHAUSTED => Self::ResourceExhausted,
            ttrpc::Code::PERMISSION_DENIED => Self::PermissionDenied,
            _ => Self::Internal,
        }
    }
}

/// A CNI error: its code and message.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// The spec's code.
    pub code: CniCode,
    /// What went wrong.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`.
    pub fn new(code: CniCode, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The error document the spec asks for on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({
            "cniVersion": version,
            "code": self.code.number(),
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

impl From<ClientError> for CniError {
    fn from(e: ClientError) -> CniError {
        CniError::new(CniCode::for_agent(e.code()), e.to_string())
    }
}

impl From<PodNetError> for CniError {
    fn from(e: PodNetError) -> CniError {
        match e {
            PodNetError::Client(e) => e.into(),
            other => CniError::new(CniCode::Internal, chain(&other)),
        }
    }
}

/// An error with its causes, `outer: inner: innermost`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
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
            return Err(CniError::new(
                CniCode::InvalidEnvironment,
                format!("{name} is not set"),
            ));
        }
        Ok(())
    }

    fn labels(&self, network: &str) -> HashMap<String, String> {
        let mut l = HashMap::from([(NETWORK_LABEL.to_owned(), network.to_owned())]);
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
        let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                CniCode::DecodingFailure,
                format!("network configuration is not JSON: {e}"),
            )
        })?;
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_string);
        let version = s("cniVersion").ok_or_else(|| {
            CniError::new(
                CniCode::InvalidNetworkConfig,
                "network configuration has no cniVersion",
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                CniCode::IncompatibleVersion,
                format!(
                    "cniVersion {version:?} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = s("name").ok_or_else(|| {
            CniError::new(
                CniCode::InvalidNetworkConfig,
                "network configuration has no name",
            )
        })?;
        check_network_name(&name)?;
        for key in ["shimConfig", "agent"] {
            if let Some(v) = raw.get(key) {
                if !v.is_string() {
                    return Err(CniError::new(
                        CniCode::InvalidNetworkConfig,
                        format!("network configuration key {key:?} must be a string"),
                    ));
                }
            }
        }
        Ok(NetConf {
            version,
            name,
            shim_config: s("shimConfig").map(PathBuf::from),
            agent: s("agent"),
            raw,
        })
    }

    /// The shim configuration (agent address and timeouts) this plugin uses.
    pub fn shim_config(&self) -> Result<ShimConfig, CniError> {
        let mut cfg = ShimConfig::resolve(self.shim_config.as_deref())
            .map_err(|e| CniError::new(CniCode::InvalidNetworkConfig, e.to_string()))?;
        if let Some(a) = &self.agent {
            cfg.agent.address = AgentAddress::parse(a).map_err(|e| {
                CniError::new(CniCode::InvalidNetworkConfig, format!("key \"agent\": {e}"))
            })?;
        }
        Ok(cfg)
    }

    /// The attachments `cni.dev/valid-attachments` lists, as (container id,
    /// interface name): what GC keeps. Per CNI 1.1 the key is required: a GC
    /// without it (or with an entry that names no attachment) is refused, so
    /// that a runtime that forgot it, or misspelt it, releases nothing.
    pub fn valid_attachments(&self) -> Result<Vec<(String, String)>, CniError> {
        let invalid = |msg: String| CniError::new(CniCode::InvalidNetworkConfig, msg);
        let list = self.raw.get(VALID_ATTACHMENTS).ok_or_else(|| {
            invalid(format!(
                "GC needs {VALID_ATTACHMENTS} (CNI 1.1): without the list of attachments \
                 still in use, nothing is released"
            ))
        })?;
        let list = list
            .as_array()
            .ok_or_else(|| invalid(format!("{VALID_ATTACHMENTS} must be an array")))?;
        list.iter()
            .enumerate()
            .map(|(i, a)| {
                let field = |k: &str| {
                    a.get(k)
                        .and_then(Value::as_str)
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            invalid(format!(
                                "{VALID_ATTACHMENTS}[{i}] has no {k} (it needs containerID and ifname)"
                            ))
                        })
                };
                Ok((field("containerID")?, field("ifname")?))
            })
            .collect()
    }
}

/// The GC key listing the attachments still in use.
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

/// A CNI network name: an alphanumeric first character, then alphanumerics,
/// `_`, `.` or `-` (the spec's rule), at most 253 bytes (the agent's label
/// value limit: the name is the GC tag of every NIC).
fn check_network_name(name: &str) -> Result<(), CniError> {
    let ok = name.len() <= 253
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            CniCode::InvalidNetworkConfig,
            format!(
                "network name {name:?}: an alphanumeric character, then alphanumerics, '_', '.' or '-' \
                 (at most 253)"
            ),
        ))
    }
}

/// Runs one CNI command; returns what goes to stdout.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    if env.command == "VERSION" {
        return Ok(commands::cmd_version());
    }
    let conf = NetConf::parse(stdin)?;
    let cfg = conf.shim_config()?;
    match env.command.as_str() {
        "ADD" => commands::cmd_add(env, &conf, &cfg).await,
        "DEL" => commands::cmd_del(env, &cfg).await,
        "CHECK" => commands::cmd_check(env, &conf, &cfg).await,
        "STATUS" => commands::cmd_status(&cfg).await,
        "GC" => commands::cmd_gc(&conf, &cfg).await,
        other => Err(CniError::new(
            CniCode::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    }
}

/// The plugin binary: reads the CNI environment and the network
/// configuration on stdin, prints the result, or the error document (and a
/// short line on stderr) and fails.
pub fn main() -> ExitCode {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            return fail(
                &env,
                DEFAULT_VERSION,
                CniError::new(
                    CniCode::DecodingFailure,
                    format!("cannot read the network configuration from stdin: {e}"),
                ),
            );
        }
    }
    // The error document speaks the configuration's version, if it names one.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .unwrap_or_else(|| DEFAULT_VERSION.into());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &env,
                &version,
                CniError::new(CniCode::Internal, format!("cannot start a runtime: {e}")),
            )
        }
    };
    match rt.block_on(run(&env, &stdin)) {
        Ok(out) => {
            let mut o = std::io::stdout();
            let _ = o.write_all(out.as_bytes());
            let _ = o.flush();
            ExitCode::SUCCESS
        }
        Err(e) => fail(&env, &version, e),
    }
}

/// The spec's way to fail: the error document on stdout, a short line on stderr.
fn fail(env: &CniEnv, version: &str, e: CniError) -> ExitCode {
    eprintln!("nestless-cni {}: {}", env.command, e.msg);
    println!("{}", e.to_json(version));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_errors_carry_spec_codes() {
        assert_eq!(
            NetConf::parse(b"{").unwrap_err().code,
            CniCode::DecodingFailure
        );
        assert_eq!(
            NetConf::parse(b"{}").unwrap_err().code,
            CniCode::InvalidNetworkConfig
        );
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, CniCode::IncompatibleVersion);
        assert!(e.msg.contains("1.1.0"));
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agent":5}"#)
                .unwrap_err()
                .code,
            CniCode::InvalidNetworkConfig
        );
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agent":"unix:///run/a.sock"}"#)
                .unwrap();
        assert_eq!(c.name, "n");
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","agent":"tcp://x"}"#)
            .unwrap()
            .shim_config()
            .unwrap_err();
        assert!(e.msg.contains("\"agent\""), "{e}");
    }

    #[test]
    fn codes_are_the_spec_numbers() {
        let numbers: Vec<u32> = [
            CniCode::IncompatibleVersion,
            CniCode::InvalidEnvironment,
            CniCode::DecodingFailure,
            CniCode::InvalidNetworkConfig,
            CniCode::TryAgainLater,
            CniCode::PluginNotAvailable,
            CniCode::Internal,
            CniCode::ResourceExhausted,
            CniCode::PermissionDenied,
        ]
        .iter()
        .map(|c| c.number())
        .collect();
        assert_eq!(numbers, [1, 4, 6, 7, 11, 50, 100, 101, 102]);
        let doc: Value =
            serde_json::from_str(&CniError::new(CniCode::TryAgainLater, "later").to_json("1.0.0"))
                .unwrap();
        assert_eq!(doc["code"], 11);
        assert_eq!(doc["msg"], "later");
        assert_eq!(doc["cniVersion"], "1.0.0");
    }

    #[test]
    fn agent_codes_become_named_cni_codes() {
        use ttrpc::Code;
        for (agent, cni) in [
            (Code::UNAVAILABLE, CniCode::TryAgainLater),
            (Code::DEADLINE_EXCEEDED, CniCode::TryAgainLater),
            (Code::RESOURCE_EXHAUSTED, CniCode::ResourceExhausted),
            (Code::PERMISSION_DENIED, CniCode::PermissionDenied),
            (Code::INVALID_ARGUMENT, CniCode::Internal),
            (Code::NOT_FOUND, CniCode::Internal),
            (Code::INTERNAL, CniCode::Internal),
        ] {
            assert_eq!(CniCode::for_agent(agent), cni, "{agent:?}");
            let refused = ClientError::AgentRefused {
                op: "AttachNic",
                code: agent,
                message: "no".into(),
            };
            assert_eq!(CniError::from(refused).code, cni, "{agent:?}");
        }
        // Unreachable, or a reply it cannot use.
        let e = CniError::from(ClientError::AgentUnavailable {
            address: "unix:///run/a.sock".into(),
            reason: "refused".into(),
        });
        assert_eq!(e.code, CniCode::TryAgainLater);
        let e = CniError::from(PodNetError::from(ClientError::BadReply("no NIC".into())));
        assert_eq!(e.code, CniCode::Internal);
        // A failure's causes are part of the message, each once.
        let e = CniError::from(PodNetError::from(crate::hostlo::HostloError::Annotation {
            key: crate::hostlo::PART_ANNOTATION,
            reason: "\"x\" is not a part number".into(),
        }));
        assert_eq!(
            e.msg,
            "cannot join the Hostlo pod: annotation io.nestless.hostlo/part: \"x\" is not a part number"
        );
        let e = CniError::from(PodNetError::from(
            crate::podnet::guest::GuestNetError::Route {
                route: crate::podnet::guest::route_text(
                    "0.0.0.0".parse().unwrap(),
                    0,
                    Some("10.0.0.1".parse().unwrap()),
                ),
                error: std::io::Error::from_raw_os_error(libc::ENETUNREACH),
            },
        ));
        assert_eq!(
            e.msg,
            "cannot add route default via 10.0.0.1: Network is unreachable (os error 101)"
        );
    }

    #[test]
    fn valid_attachments_are_required_and_whole() {
        let parse = |extra: &str| {
            NetConf::parse(format!(r#"{{"cniVersion":"1.1.0","name":"n"{extra}}}"#).as_bytes())
                .unwrap()
                .valid_attachments()
        };
        let list = parse(
            r#","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"a","ifname":"net1"}]"#,
        )
        .unwrap();
        assert_eq!(
            list,
            [("a".into(), "eth0".into()), ("a".into(), "net1".into())]
        );
        assert_eq!(parse(r#","cni.dev/valid-attachments":[]"#).unwrap(), []);
        for bad in [
            "",                                                      // missing
            r#","cni.dev/attachments":[]"#,                          // the wrong key
            r#","cni.dev/valid-attachments":{}"#,                    // not an array
            r#","cni.dev/valid-attachments":[{"ifname":"x"}]"#,      // no container
            r#","cni.dev/valid-attachments":[{"containerID":"a"}]"#, // no interface
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, CniCode::InvalidNetworkConfig, "{bad}: {e}");
            assert!(e.msg.contains("cni.dev/valid-attachments"), "{e}");
        }
    }

    #[test]
    fn network_names_follow_the_spec() {
        for ok in ["nestless", "a", "net-1.b_2"] {
            NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"{ok}"}}"#).as_bytes())
                .unwrap();
        }
        for bad in [
            r#""#,
            r#","name":"""#,
            r#","name":"-x""#,
            r#","name":"a/b""#,
        ] {
            let e =
                NetConf::parse(format!(r#"{{"cniVersion":"1.0.0"{bad}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.code, CniCode::InvalidNetworkConfig, "{bad}");
        }
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
        assert_eq!(
            (e.code, e.msg.as_str()),
            (CniCode::InvalidEnvironment, "CNI_CONTAINERID is not set")
        );
        let env = CniEnv {
            command: "BOGUS".into(),
            ..Default::default()
        };
        assert_eq!(
            run(&env, conf).await.unwrap_err().code,
            CniCode::InvalidEnvironment
        );
    }
}
