//! The CRI path on this machine: `nestless-cri` (a CRI client, gRPC as kubelet
//! speaks it) against a private [`Containerd`], and the CNI networks CRI runs.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use serde_json::Value;

use crate::{
    agent::bin_path,
    containerd::{run, Containerd, BUSYBOX_IMAGE, CTR_TIMEOUT},
};

/// containerd's namespace for CRI.
pub const K8S_NS: &str = "k8s.io";

/// `nestless-cri ARGS` against `c`'s socket: its JSON, or its error text.
pub fn try_cri(c: &Containerd, args: &[&str]) -> Result<Value, String> {
    let mut cmd = Command::new(bin_path("nestless-cri"));
    cmd.arg("--endpoint").arg(c.address()).args(args);
    let r = run(cmd, None, CTR_TIMEOUT);
    if r.code != 0 {
        return Err(format!("exit {}: {}", r.code, r.stderr.trim()));
    }
    serde_json::from_str(&r.stdout).map_err(|e| format!("not JSON ({e}): {}", r.stdout))
}

/// `nestless-cri ARGS` that must succeed (the panic carries containerd's log).
pub fn cri(c: &Containerd, args: &[&str]) -> Value {
    try_cri(c, args).unwrap_or_else(|e| {
        panic!(
            "nestless-cri {}: {e}\ncontainerd log:\n{}",
            args.join(" "),
            c.log_tail(60)
        )
    })
}

/// CreateContainer + StartContainer of a busybox container `name` in `pod`, running
/// `command`; the container's id.
pub fn run_busybox(c: &Containerd, pod: &str, name: &str, command: &[&str]) -> String {
    let mut args = vec![
        "run",
        "--pod",
        pod,
        "--name",
        name,
        "--image",
        BUSYBOX_IMAGE,
        "--",
    ];
    args.extend_from_slice(command);
    cri(c, &args)["id"]
        .as_str()
        .expect("run prints the container id")
        .to_owned()
}

/// CRI's network is the shipped `config/10-nestless.conflist` (nestless-cni),
/// pointed at `c`'s shim config; nestless-cni joins the plugins in CRI's bin_dir.
pub fn use_nestless_cni(c: &Containerd) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/10-nestless.conflist");
    let mut conflist: Value =
        serde_json::from_str(&fs::read_to_string(&shipped).expect("the shipped conflist"))
            .expect("config/10-nestless.conflist is JSON");
    conflist["plugins"][0]["shimConfig"] = c.shim_config().to_string_lossy().into();
    write_conflist(c, "10-nestless.conflist", &conflist);
    symlink(
        bin_path("nestless-cni"),
        c.dir().join("cni/bin/nestless-cni"),
    )
    .expect("link nestless-cni");
}

/// CRI's network is the CNI bridge plugin with NAT, as a nested setup runs it:
/// bridge `bridge` with the gateway `<net>.1`, host-local addresses from `<net>.0/24`.
pub fn use_bridge_cni(c: &Containerd, bridge: &str, net: &str) {
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "nested",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": format!("{net}.0/24") }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": c.dir().join("cni/ipam").to_string_lossy(),
            }
        }]
    });
    write_conflist(c, "10-nested.conflist", &conflist);
}

fn write_conflist(c: &Containerd, name: &str, conflist: &Value) {
    assert!(
        c.dir().join("cni/bin/loopback").exists(),
        "/usr/lib/cni/loopback is missing: apt-get install -y containernetworking-plugins"
    );
    fs::write(c.dir().join("cni/net.d").join(name), conflist.to_string())
        .expect("write the conflist");
}
