//! Shim configuration: `/etc/nestless/shim.toml`, or the file named by the
//! runtime options containerd sends with each task (`config_path`).
//!
//! The file is parsed into raw serde structs (`deny_unknown_fields`, so a
//! misspelt key is an error), then checked into [`ShimConfig`], whose values
//! are typed (agent address, durations, interface name, absolute paths). Every
//! error names the file and the key, e.g.
//! `/etc/nestless/shim.toml: agent.address: "tcp://x" is neither vsock://CID:PORT nor unix:///PATH`.
//!
//! Every key is optional; a missing file means the defaults.
//!
//! ```toml
//! log_level = "info"
//!
//! [agent]
//! address = "vsock://2:7070"
//! connect_timeout_ms = 1000
//! request_timeout_ms = 5000
//!
//! [network]
//! mode = "agent"          # or "none": no host-provided NIC at all
//! interface = "eth0"
//! nic_wait_ms = 3000
//!
//! [runc]
//! binary = "runc"
//! root = "/run/containerd/runc"   # the containerd namespace is appended
//! systemd_cgroup = false
//! ```

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Where the shim looks for its configuration when the runtime options name none.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nestless/shim.toml";

/// vsock CID of the host, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read shim config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's account, with line and key.
        message: String,
    },
    /// A value is wrong.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `agent.address`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

// ---------------------------------------------------------------- raw form

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    log_level: Option<String>,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    runc: RawRunc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    address: Option<String>,
    connect_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: Option<NetworkMode>,
    interface: Option<String>,
    nic_wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunc {
    binary: Option<PathBuf>,
    root: Option<PathBuf>,
    systemd_cgroup: Option<bool>,
}

// ---------------------------------------------------------------- checked form

/// The checked shim configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// The file it was read from; `None` for built-in defaults.
    pub source: Option<PathBuf>,
    /// Log level of the shim (`error`, `warn`, `info`, `debug`, `trace`).
    pub log_level: log::LevelFilter,
    /// How to reach the host agent.
    pub agent: AgentEndpoint,
    /// What the shim does for pod networks.
    pub network: PodNetConfig,
    /// How runc is run.
    pub runc: RuncConfig,
}

/// `[agent]`: how to reach the host agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The agent's address (default `vsock://2:7070`).
    pub address: AgentAddress,
    /// Deadline for connecting to the agent (default 1 s).
    pub connect_timeout: Duration,
    /// Deadline for one agent request (default 5 s).
    pub request_timeout: Duration,
}

/// `[network]`: what the shim does for pod networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetConfig {
    /// `agent` (ask the host agent for a NIC) or `none`.
    pub mode: NetworkMode,
    /// Name the NIC gets inside the pod netns (default `eth0`).
    pub interface: InterfaceName,
    /// How long to wait for a hot-plugged NIC to appear (default 3 s).
    pub nic_wait: Duration,
}

/// `[runc]`: how runc is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncConfig {
    /// The runc binary, a path or a name looked up in `PATH` (default `runc`).
    pub binary: PathBuf,
    /// runc's state root; the containerd namespace is appended (default `/run/containerd/runc`).
    pub root: PathBuf,
    /// Use runc's systemd cgroup driver.
    pub systemd_cgroup: bool,
}

/// `network.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Ask the host agent for a NIC for each pod sandbox.
    Agent,
    /// Do nothing for the network (the sandbox keeps what runc or CNI gave it).
    None,
}

/// Where the host agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// `vsock://CID:PORT`.
    Vsock {
        /// Context id (2 is the host).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// `unix:///path` (tests, or vhost-device-vsock's unix side).
    Unix(PathBuf),
}

/// A Linux interface name: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// Checks `name`; the error says what is wrong.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() > 15 {
            return Err(format!("{name:?} must be 1 to 15 bytes long"));
        }
        if name == "." || name == ".." {
            return Err(format!("{name:?} is not a usable interface name"));
        }
        if name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(format!("{name:?} contains '/', ':' or whitespace"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AgentAddress {
    /// Parses `vsock://CID:PORT` or `unix:///absolute/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected vsock://CID:PORT"))?;
            let cid: u32 = cid
                .parse()
                .map_err(|_| format!("{s:?}: CID {cid:?} is not a number"))?;
            let port: u32 = port
                .parse()
                .map_err(|_| format!("{s:?}: port {port:?} is not a number"))?;
            if port == 0 || port == u32::MAX {
                return Err(format!("{s:?}: port {port} is not usable"));
            }
            if cid == u32::MAX {
                return Err(format!("{s:?}: CID {cid} is not usable"));
            }
            Ok(Self::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(format!(
                "{s:?} is neither vsock://CID:PORT nor unix:///PATH"
            ))
        }
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            source: None,
            log_level: log::LevelFilter::Info,
            agent: AgentEndpoint {
                address: AgentAddress::Vsock {
                    cid: HOST_CID,
                    port: nestless_protos::DEFAULT_VSOCK_PORT,
                },
                connect_timeout: Duration::from_millis(1000),
                request_timeout: Duration::from_millis(5000),
            },
            network: PodNetConfig {
                mode: NetworkMode::Agent,
                interface: InterfaceName("eth0".to_owned()),
                nic_wait: Duration::from_millis(3000),
            },
            runc: RuncConfig {
                binary: PathBuf::from("runc"),
                root: PathBuf::from("/run/containerd/runc"),
                systemd_cgroup: false,
            },
        }
    }
}

impl ShimConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads `explicit` if given (it must exist), else [`DEFAULT_CONFIG_PATH`]
    /// if it exists, else returns the defaults.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        match explicit {
            Some(path) => Self::load(path),
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                match std::fs::metadata(path) {
                    Ok(_) => Self::load(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
                    Err(source) => Err(ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    }),
                }
            }
        }
    }

    /// Parses and checks `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let defaults = Self::default();

        let log_level = match raw.log_level.as_deref() {
            None => defaults.log_level,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "off" => log::LevelFilter::Off,
                "error" => log::LevelFilter::Error,
                "warn" => log::LevelFilter::Warn,
                "info" => log::LevelFilter::Info,
                "debug" => log::LevelFilter::Debug,
                "trace" => log::LevelFilter::Trace,
                _ => {
                    return Err(invalid(
                        "log_level",
                        format!("{s:?} is not one of off, error, warn, info, debug, trace"),
                    ))
                }
            },
        };

        let address = match raw.agent.address.as_deref() {
            None => defaults.agent.address,
            Some(s) => AgentAddress::parse(s).map_err(|m| invalid("agent.address", m))?,
        };
        let millis = |key: &'static str, v: Option<u64>, default: Duration| match v {
            None => Ok(default),
            Some(0) => Err(invalid(key, "must be greater than 0".to_owned())),
            Some(ms) if ms > 3_600_000 => {
                Err(invalid(key, format!("{ms} ms is more than an hour")))
            }
            Some(ms) => Ok(Duration::from_millis(ms)),
        };
        let connect_timeout = millis(
            "agent.connect_timeout_ms",
            raw.agent.connect_timeout_ms,
            defaults.agent.connect_timeout,
        )?;
        let request_timeout = millis(
            "agent.request_timeout_ms",
            raw.agent.request_timeout_ms,
            defaults.agent.request_timeout,
        )?;
        let nic_wait = millis(
            "network.nic_wait_ms",
            raw.network.nic_wait_ms,
            defaults.network.nic_wait,
        )?;
        let interface = match raw.network.interface.as_deref() {
            None => defaults.network.interface,
            Some(s) => InterfaceName::new(s).map_err(|m| invalid("network.interface", m))?,
        };

        let binary = match raw.runc.binary {
            None => defaults.runc.binary,
            Some(b) if b.as_os_str().is_empty() => {
                return Err(invalid("runc.binary", "must not be empty".to_owned()))
            }
            Some(b) => b,
        };
        let root = match raw.runc.root {
            None => defaults.runc.root,
            Some(r) if !r.is_absolute() => {
                return Err(invalid(
                    "runc.root",
                    format!("{} is not an absolute path", r.display()),
                ))
            }
            Some(r) => r,
        };

        Ok(Self {
            source: Some(path.to_owned()),
            log_level,
            agent: AgentEndpoint {
                address,
                connect_timeout,
                request_timeout,
            },
            network: PodNetConfig {
                mode: raw.network.mode.unwrap_or(defaults.network.mode),
                interface,
                nic_wait,
            },
            runc: RuncConfig {
                binary,
                root,
                systemd_cgroup: raw
                    .runc
                    .systemd_cgroup
                    .unwrap_or(defaults.runc.systemd_cgroup),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ShimConfig, ConfigError> {
        ShimConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            ShimConfig {
                source: None,
                ..c.clone()
            },
            ShimConfig::default()
        );
        assert_eq!(c.agent.address.to_string(), "vsock://2:7070");
        assert_eq!(c.network.mode, NetworkMode::Agent);
        assert_eq!(c.network.interface.as_str(), "eth0");
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/shim.toml");
        let c = ShimConfig::load(&path).unwrap();
        assert_eq!(c.agent.address, AgentAddress::Vsock { cid: 2, port: 7070 });
        assert_eq!(c.network.mode, NetworkMode::Agent);
        assert_eq!(c.runc.binary, PathBuf::from("runc"));
        assert!(c.runc.root.is_absolute());
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
            log_level = "debug"
            [agent]
            address = "unix:///run/nestless/agent.sock"
            connect_timeout_ms = 200
            request_timeout_ms = 900
            [network]
            mode = "none"
            interface = "net0"
            nic_wait_ms = 50
            [runc]
            binary = "/usr/sbin/runc"
            root = "/tmp/runc"
            systemd_cgroup = true
            "#,
        )
        .unwrap();
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(
            c.agent.address,
            AgentAddress::Unix(PathBuf::from("/run/nestless/agent.sock"))
        );
        assert_eq!(c.agent.connect_timeout, Duration::from_millis(200));
        assert_eq!(c.agent.request_timeout, Duration::from_millis(900));
        assert_eq!(c.network.mode, NetworkMode::None);
        assert_eq!(c.network.interface.as_str(), "net0");
        assert_eq!(c.network.nic_wait, Duration::from_millis(50));
        assert_eq!(c.runc.binary, PathBuf::from("/usr/sbin/runc"));
        assert!(c.runc.systemd_cgroup);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[agent]\nadress = \"vsock://2:1\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("test.toml:"), "{s}");
        assert!(s.contains("adress"), "{s}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("[agent]\naddress = \"tcp://1.2.3.4:5\"", "agent.address"),
            ("[agent]\naddress = \"vsock://2\"", "agent.address"),
            ("[agent]\naddress = \"unix://rel/path\"", "agent.address"),
            (
                "[agent]\nconnect_timeout_ms = 0",
                "agent.connect_timeout_ms",
            ),
            (
                "[network]\ninterface = \"a-very-long-interface\"",
                "network.interface",
            ),
            ("[network]\ninterface = \"a/b\"", "network.interface"),
            ("[network]\nnic_wait_ms = 0", "network.nic_wait_ms"),
            ("[runc]\nroot = \"relative\"", "runc.root"),
            ("[runc]\nbinary = \"\"", "runc.binary"),
            ("log_level = \"loud\"", "log_level"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("test.toml: {key}:")),
                "{text}: {e}"
            );
        }
        let e = parse("[network]\nmode = \"bridge\"").unwrap_err();
        assert!(e.to_string().contains("mode"), "{e}");
    }

    #[test]
    fn resolve_explicit_missing_file_is_an_error() {
        let e = ShimConfig::resolve(Some(Path::new("/nonexistent/shim.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/shim.toml"), "{e}");
    }
}
