//! Many tenants, one agent (issue 11): configurations that cannot work are
//! refused, a bridge's port limit is a clear refusal, a state file that
//! breaks the invariants stops the start, refused input cannot flood the
//! log, and one tenant's cancellations cannot break another's operations.
//! The real agent binary; the tests that make links need root.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use nestless_tests::agent::bin_path;

/// `nestless-netagent --config PATH ARGS...`: (exit code, stdout + stderr).
fn agent_cmd(path: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin_path("nestless-netagent"))
        .arg("--config")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Issue 11, item 9: each configuration that loads but cannot work is
/// refused by `--check-config` (exit 2) naming the file and the key, and
/// the agent refuses to start on it the same way.
#[test]
fn configs_that_cannot_work_are_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let agent = format!("[agent]\nstate_dir = \"{d}/state\"\nadmin_socket = \"{d}/admin.sock\"\n");
    let net = "[[network]]\nname = \"n\"\nbridge = \"br-t\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n";
    let netns_vm = |name: &str, ns: &str, sock: &str| {
        format!("[[vm]]\nname = \"{name}\"\nbackend = \"netns\"\nnetns = \"{ns}\"\nsocket = \"{sock}\"\n")
    };
    let qemu_vm = |name: &str, qmp: &str, cid: u32| {
        format!(
            "[[vm]]\nname = \"{name}\"\nbackend = \"qemu\"\nqmp_socket = \"{qmp}\"\ncid = {cid}\n"
        )
    };
    let with_net = |n: &str| format!("{agent}[[network]]\nname = \"n\"\nbridge = \"br-t\"\n{n}\n");
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{agent}{net}{}", netns_vm("a", "x", &format!("{d}/admin.sock"))),
            "vm[0] (\"a\").socket",
        ),
        (
            format!(
                "{agent}{net}{}{}",
                netns_vm("a", "x", &format!("{d}/a.sock")),
                netns_vm("b", "y", &format!("{d}/a.sock"))
            ),
            "vm[1] (\"b\").socket",
        ),
        (
            format!("{agent}{net}{}{}", qemu_vm("a", "/run/q.qmp", 3), qemu_vm("b", "/run/q.qmp", 4)),
            "vm[1] (\"b\").qmp_socket",
        ),
        (
            format!(
                "{agent}{net}{}{}",
                netns_vm("a", "shared", &format!("{d}/a.sock")),
                netns_vm("b", "shared", &format!("{d}/b.sock"))
            ),
            "vm[1] (\"b\").netns",
        ),
        (format!("[agent]\nstate_dir = \"state\"\n{net}"), "agent.state_dir"),
        (format!("[agent]\nadmin_socket = \"admin.sock\"\n{net}"), "agent.admin_socket"),
        (format!("{agent}{net}{}", netns_vm("a", "x", "a.sock")), "vm[0] (\"a\").socket"),
        (with_net("subnet = \"224.1.0.0/24\"\ngateway = \"224.1.0.1\""), "network[0] (\"n\").subnet"),
        (with_net("subnet = \"127.0.0.0/24\"\ngateway = \"127.0.0.1\""), "network[0] (\"n\").subnet"),
        (with_net("subnet = \"0.0.0.0/1\"\ngateway = \"10.0.0.1\""), "network[0] (\"n\").subnet"),
        (
            with_net("subnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\nsubnet6 = \"::/1\""),
            "network[0] (\"n\").subnet6",
        ),
        (
            with_net("subnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\nsubnet6 = \"ff02::/64\""),
            "network[0] (\"n\").subnet6",
        ),
        (
            format!("{agent}[[network]]\nname = \"n\"\nbridge = \"nlh0\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n"),
            "network[0] (\"n\").bridge",
        ),
        (
            format!("{agent}[[network]]\nname = \"n\"\nbridge = \"nls00000001\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n"),
            "network[0] (\"n\").bridge",
        ),
        (
            format!("{agent}[[network]]\nname = \"n\"\nbridge = \"a-bridge-too-long\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n"),
            "network[0] (\"n\").bridge",
        ),
        (
            format!("{agent}[[network]]\nname = \"n\"\nbridge = \"br\\u0007\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n"),
            "network[0] (\"n\").bridge",
        ),
        (
            format!("{agent}[[network]]\nname = \"n\\n\"\nbridge = \"br-t\"\nsubnet = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n"),
            "network[0]",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("case{i}.toml"), text);
        let (code, out) = agent_cmd(&p, &["--check-config"]);
        assert_eq!(code, 2, "case {i} accepted:\n{text}\n{out}");
        assert!(
            out.contains(&p.display().to_string()) && out.contains(key),
            "case {i}: expected the file and {key:?} in: {out}"
        );
    }
    // At start, the same refusal, before anything is bound or made.
    let p = write(
        dir.path(),
        "start.toml",
        &format!(
            "{agent}{net}{}",
            netns_vm("a", "x", &format!("{d}/admin.sock"))
        ),
    );
    let (code, out) = agent_cmd(&p, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("vm[0] (\"a\").socket") && out.contains("admin socket"),
        "{out}"
    );
    assert!(
        !dir.path().join("admin.sock").exists(),
        "the agent bound its socket"
    );
}
