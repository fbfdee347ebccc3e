//! The shipped containerd drop-ins, one per configuration generation, read, checked and
//! adapted to a test's paths. What the containerd matrix runs is the shipped file itself,
//! with only the paths a test owns replaced:
//!
//! | generation | file | containerd | CRI plugin sections |
//! |---|---|---|---|
//! | [`Generation::V2`] | `config/containerd-nestless.toml` | 1.6, 1.7 | `io.containerd.grpc.v1.cri` |
//! | [`Generation::V3`] | `config/containerd-nestless-v3.toml` | 2.x | `io.containerd.cri.v1.images`, `io.containerd.cri.v1.runtime` |

use std::path::{Path, PathBuf};

use crate::containerd::{CRI_HANDLER, RUNTIME};

/// A containerd configuration generation (its `version = N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// `version = 2`: containerd 1.6 and 1.7.
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

impl Generation {
    /// The generation containerd `major` reads natively.
    pub fn for_major(major: u32) -> Generation {
        if major >= 2 {
            Generation::V3
        } else {
            Generation::V2
        }
    }

    /// Its `version` number.
    pub fn number(self) -> i64 {
        match self {
            Generation::V2 => 2,
            Generation::V3 => 3,
        }
    }

    /// The shipped drop-in, relative to the workspace.
    pub fn file(self) -> &'static str {
        match self {
            Generation::V2 => "config/containerd-nestless.toml",
            Generation::V3 => "config/containerd-nestless-v3.toml",
        }
    }

    /// The path of its shipped drop-in.
    pub fn path(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(self.file())
    }

    /// Keys of the table that holds the CRI runtimes' `containerd` section.
    fn runtime_plugin(self) -> &'static str {
        match self {
            Generation::V2 => "io.containerd.grpc.v1.cri",
            Generation::V3 => "io.containerd.cri.v1.runtime",
        }
    }
}

/// What a test replaces in a shipped drop-in.
#[derive(Debug, Clone, Default)]
pub struct Adapt {
    /// The pause image (CRI's sandbox image).
    pub sandbox_image: String,
    /// The shim config the `nestless` handler's options name.
    pub shim_config: Option<PathBuf>,
    /// CNI's plugin directory.
    pub cni_bin_dir: Option<PathBuf>,
    /// CNI's configuration directory.
    pub cni_conf_dir: Option<PathBuf>,
    /// Set `restrict_oom_score_adj` (root without CAP_SYS_RESOURCE needs it).
    pub restrict_oom_score_adj: bool,
}

/// A drop-in parsed from its shipped file; panics naming the file if it is not TOML.
pub fn shipped(generation: Generation) -> toml::Table {
    let path = generation.path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()))
}

fn table<'a>(t: &'a mut toml::Table, keys: &[&str], file: &str) -> &'a mut toml::Table {
    let mut cur = t;
    for k in keys {
        cur = cur
            .get_mut(*k)
            .and_then(toml::Value::as_table_mut)
            .unwrap_or_else(|| panic!("{file} has no table {}", keys.join(".")));
    }
    cur
}

/// The `nestless` runtime's table of a drop-in.
pub fn nestless_runtime(doc: &mut toml::Table, generation: Generation) -> &mut toml::Table {
    table(
        doc,
        &[
            "plugins",
            generation.runtime_plugin(),
            "containerd",
            "runtimes",
            CRI_HANDLER,
        ],
        generation.file(),
    )
}

/// The shipped drop-in of `generation`, checked (our runtime, its `pod_annotations`, its
/// options) and adapted; its TOML text.
pub fn adapted(generation: Generation, adapt: &Adapt) -> String {
    let mut doc = shipped(generation);
    let file = generation.file();
    assert_eq!(
        doc.get("version").and_then(toml::Value::as_integer),
        Some(generation.number()),
        "{file}: version"
    );
    let rt = nestless_runtime(&mut doc, generation);
    assert_eq!(
        rt.get("runtime_type").and_then(toml::Value::as_str),
        Some(RUNTIME),
        "{file}: runtime_type"
    );
    assert_eq!(
        rt.get("pod_annotations").and_then(toml::Value::as_array),
        Some(&vec![toml::Value::from("io.nestless.hostlo/*")]),
        "{file}: pod_annotations"
    );
    if let Some(p) = &adapt.shim_config {
        table(rt, &["options"], file)
            .insert("ConfigPath".into(), p.to_string_lossy().into_owned().into());
    }
    let (images, sandbox_key) = match generation {
        Generation::V2 => (
            vec!["plugins", "io.containerd.grpc.v1.cri"],
            "sandbox_image",
        ),
        Generation::V3 => (
            vec!["plugins", "io.containerd.cri.v1.images", "pinned_images"],
            "sandbox",
        ),
    };
    table(&mut doc, &images, file).insert(sandbox_key.into(), adapt.sandbox_image.clone().into());
    let runtime = table(&mut doc, &["plugins", generation.runtime_plugin()], file);
    if adapt.restrict_oom_score_adj {
        runtime.insert("restrict_oom_score_adj".into(), true.into());
    }
    let cni = table(runtime, &["cni"], file);
    if let Some(d) = &adapt.cni_bin_dir {
        let d = d.to_string_lossy().into_owned();
        match generation {
            Generation::V2 => cni.insert("bin_dir".into(), d.into()),
            Generation::V3 => cni.insert("bin_dirs".into(), vec![toml::Value::from(d)].into()),
        };
    }
    if let Some(d) = &adapt.cni_conf_dir {
        cni.insert("conf_dir".into(), d.to_string_lossy().into_owned().into());
    }
    format!(
        "# Generated by nestless_tests::dropin from {file}.\n{}",
        toml::to_string(&doc).expect("TOML serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both shipped drop-ins parse, name our runtime with its annotations and options, the
    /// CNI directories of the shipped conflist and a sandbox image, each in its generation's
    /// plugin sections.
    #[test]
    fn shipped_dropins_parse_and_name_our_runtime() {
        for g in [Generation::V2, Generation::V3] {
            let mut doc = shipped(g);
            assert_eq!(
                doc["version"].as_integer(),
                Some(g.number()),
                "{}",
                g.file()
            );
            let rt = nestless_runtime(&mut doc, g).clone();
            assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME));
            assert_eq!(
                rt["options"]["ConfigPath"].as_str(),
                Some("/etc/nestless/shim.toml"),
                "{}",
                g.file()
            );
            let plugins = &doc["plugins"];
            let cni = &plugins[g.runtime_plugin()]["cni"];
            assert_eq!(cni["conf_dir"].as_str(), Some("/etc/cni/net.d"));
            let sandbox = match g {
                Generation::V2 => {
                    assert_eq!(cni["bin_dir"].as_str(), Some("/opt/cni/bin"));
                    &plugins["io.containerd.grpc.v1.cri"]["sandbox_image"]
                }
                Generation::V3 => {
                    assert_eq!(
                        cni["bin_dirs"].as_array(),
                        Some(&vec![toml::Value::from("/opt/cni/bin")])
                    );
                    // No version-2 plugin name in a version-3 file.
                    assert!(plugins.get("io.containerd.grpc.v1.cri").is_none());
                    &plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"]
                }
            };
            assert!(sandbox.as_str().is_some_and(|s| s.contains("pause")));
            let adapted = adapted(
                g,
                &Adapt {
                    sandbox_image: "x/pause:t".into(),
                    shim_config: Some("/tmp/s.toml".into()),
                    cni_bin_dir: Some("/tmp/bin".into()),
                    cni_conf_dir: Some("/tmp/net.d".into()),
                    restrict_oom_score_adj: true,
                },
            );
            let back: toml::Table = adapted.parse().expect("the adapted drop-in is TOML");
            assert!(toml::to_string(&back).unwrap().contains("/tmp/s.toml"));
        }
    }
}
