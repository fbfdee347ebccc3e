//! Runtime options: the `google.protobuf.Any` containerd sends in
//! `CreateTaskRequest.options` (and on the standard input of `shim start`).
//!
//! Two kinds are understood:
//! - `runtimeoptions.v1.Options` (what containerd's CRI sends for runtimes
//!   that are not runc, and `ctr run --runtime-config-path`): its
//!   `config_path` names the shim's TOML configuration;
//! - `containerd.runc.v1.Options` (what a runc-style client may send): runc
//!   binary, root, systemd cgroups, `no_pivot_root`, `no_new_keyring`,
//!   `shim_cgroup`. These override the `[runc]` section of the configuration.
//!
//! Any other type is an error naming the type.

use std::path::PathBuf;

use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, CodedInputStream, Message},
    shim::oci::Options as RuncProtoOptions,
};

use crate::error::{Result, ShimError};

/// Type name of CRI's generic runtime options.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Type name of runc's options.
pub const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

/// The options that matter to this shim.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Where the shim configuration is (`runtimeoptions.v1.Options.config_path`).
    pub config_path: Option<PathBuf>,
    /// runc options, when the client sent `containerd.runc.v1.Options`.
    pub runc: Option<RuncOptions>,
}

/// The fields of `containerd.runc.v1.Options` the shim honours.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuncOptions {
    /// `--no-pivot` on create.
    pub no_pivot_root: bool,
    /// `--no-new-keyring` on create and exec.
    pub no_new_keyring: bool,
    /// Cgroup to move the shim into (honoured by `start`).
    pub shim_cgroup: Option<String>,
    /// runc binary, overriding `[runc] binary`.
    pub binary_name: Option<PathBuf>,
    /// runc root, overriding `[runc] root`.
    pub root: Option<PathBuf>,
    /// systemd cgroups (overrides `[runc] systemd_cgroup` when set).
    pub systemd_cgroup: bool,
}

impl RuntimeOptions {
    /// Decodes the options of a Create request; `None` (or an empty Any) means none.
    pub fn from_any(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any else {
            return Ok(Self::default());
        };
        if any.type_url.is_empty() && any.value.is_empty() {
            return Ok(Self::default());
        }
        // Type URLs may carry a host prefix (`types.googleapis.com/...`).
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        match name {
            RUNTIME_OPTIONS_TYPE => Ok(Self {
                config_path: decode_config_path(&any.value)?,
                runc: None,
            }),
            RUNC_OPTIONS_TYPE => {
                let o = RuncProtoOptions::parse_from_bytes(&any.value).map_err(|e| {
                    ShimError::invalid("options", format!("{RUNC_OPTIONS_TYPE}: {e}"))
                })?;
                let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                Ok(Self {
                    config_path: None,
                    runc: Some(RuncOptions {
                        no_pivot_root: o.no_pivot_root,
                        no_new_keyring: o.no_new_keyring,
                        shim_cgroup: non_empty(&o.shim_cgroup),
                        binary_name: non_empty(&o.binary_name).map(PathBuf::from),
                        root: non_empty(&o.root).map(PathBuf::from),
                        systemd_cgroup: o.systemd_cgroup,
                    }),
                })
            }
            other => Err(ShimError::invalid(
                "options",
                format!(
                    "type {other:?} is not understood (expected {RUNTIME_OPTIONS_TYPE} or {RUNC_OPTIONS_TYPE})"
                ),
            )),
        }
    }

    /// Decodes the serialized Any that containerd writes to `shim start`'s standard input.
    pub fn from_any_bytes(data: &[u8]) -> Result<Self> {
        if data.is_empty() {
            return Ok(Self::default());
        }
        let any = Any::parse_from_bytes(data)
            .map_err(|e| ShimError::invalid("options", format!("not a protobuf Any: {e}")))?;
        Self::from_any(Some(&any))
    }
}

/// Reads field 2 (`config_path`) of `runtimeoptions.v1.Options`
/// (`string type_url = 1; string config_path = 2;`); other fields are skipped.
fn decode_config_path(value: &[u8]) -> Result<Option<PathBuf>> {
    let bad = |e: containerd_shim_protos::protobuf::Error| {
        ShimError::invalid("options", format!("{RUNTIME_OPTIONS_TYPE}: {e}"))
    };
    let mut input = CodedInputStream::from_bytes(value);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == 2 && wire_type == 2 {
            let s = input.read_string().map_err(bad)?;
            path = (!s.is_empty()).then(|| PathBuf::from(s));
        } else {
            let wt = containerd_shim_protos::protobuf::rt::WireType::new(wire_type).ok_or_else(
                || {
                    ShimError::invalid(
                        "options",
                        format!("{RUNTIME_OPTIONS_TYPE}: bad wire type {wire_type}"),
                    )
                },
            )?;
            input.skip_field(wt).map_err(bad)?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::protobuf::CodedOutputStream;

    use super::*;

    fn runtime_options(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut buf);
            out.write_string(1, type_url).unwrap();
            out.write_string(2, config_path).unwrap();
            out.write_uint32(9, 5).unwrap(); // an unknown field
            out.flush().unwrap();
        }
        buf
    }

    #[test]
    fn none_and_empty() {
        assert_eq!(
            RuntimeOptions::from_any(None).unwrap(),
            RuntimeOptions::default()
        );
        assert_eq!(
            RuntimeOptions::from_any(Some(&Any::new())).unwrap(),
            RuntimeOptions::default()
        );
        assert_eq!(
            RuntimeOptions::from_any_bytes(&[]).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn cri_runtime_options_give_the_config_path() {
        let any = Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value: runtime_options("", "/etc/nestless/pod.toml"),
            ..Default::default()
        };
        let o = RuntimeOptions::from_any(Some(&any)).unwrap();
        assert_eq!(o.config_path, Some(PathBuf::from("/etc/nestless/pod.toml")));
        assert_eq!(o.runc, None);

        // The same, serialized as containerd writes it on start's stdin, with a URL prefix.
        let any = Any {
            type_url: format!("types.googleapis.com/{RUNTIME_OPTIONS_TYPE}"),
            value: runtime_options("x", "/a.toml"),
            ..Default::default()
        };
        let o = RuntimeOptions::from_any_bytes(&any.write_to_bytes().unwrap()).unwrap();
        assert_eq!(o.config_path, Some(PathBuf::from("/a.toml")));
    }

    #[test]
    fn runc_options() {
        let opts = RuncProtoOptions {
            binary_name: "/opt/runc".into(),
            root: "/run/r".into(),
            systemd_cgroup: true,
            no_pivot_root: true,
            ..Default::default()
        };
        let any = Any {
            type_url: RUNC_OPTIONS_TYPE.into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let o = RuntimeOptions::from_any(Some(&any)).unwrap();
        let r = o.runc.unwrap();
        assert_eq!(r.binary_name, Some(PathBuf::from("/opt/runc")));
        assert_eq!(r.root, Some(PathBuf::from("/run/r")));
        assert!(r.systemd_cgroup && r.no_pivot_root && !r.no_new_keyring);
        assert_eq!(r.shim_cgroup, None);
    }

    #[test]
    fn unknown_type_is_named() {
        let any = Any {
            type_url: "example.Other".into(),
            value: vec![1, 2],
            ..Default::default()
        };
        let e = RuntimeOptions::from_any(Some(&any)).unwrap_err();
        assert!(e.to_string().contains("example.Other"), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        let any = Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value: vec![0x12, 0x40, b'a'],
            ..Default::default()
        };
        assert!(RuntimeOptions::from_any(Some(&any)).is_err());
    }
}
