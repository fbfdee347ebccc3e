//! Test tool: runs the shim's pod-network code (`podnet::agent::AgentNetwork`)
//! for one sandbox without containerd, so that tests can give a plain network
//! namespace its host-provided NIC (and its Hostlo part) from inside a "VM"
//! namespace. Prints `READY <json>` once set up, tears down on SIGTERM/SIGINT
//! and prints `DONE`.
//!
//! nestless-podnet --agent unix:///run/x.sock --sandbox SB [--scope NS] --netns /run/netns/pod \
//!     [--label k=v]... [--nic-wait-ms 3000]

use std::{collections::HashMap, path::PathBuf, time::Duration};

use nestless_shim::{
    config::{AgentAddress, ShimConfig},
    podnet::{agent::AgentNetwork, PodNetRequest, PodNetwork, SandboxRef},
};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut cfg = ShimConfig::default();
    let (mut sandbox, mut netns, mut labels) = (String::new(), PathBuf::new(), HashMap::new());
    let mut scope = String::new();
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--agent" => cfg.agent.address = AgentAddress::parse(&val()).expect("--agent"),
            "--sandbox" => sandbox = val(),
            "--scope" => scope = val(),
            "--netns" => netns = PathBuf::from(val()),
            "--label" => {
                let kv = val();
                let (k, v) = kv.split_once('=').expect("--label k=v");
                labels.insert(k.to_string(), v.to_string());
            }
            "--nic-wait-ms" => {
                cfg.network.nic_wait = Duration::from_millis(val().parse().expect("ms"))
            }
            other => panic!("unknown argument {other}"),
        }
    }
    cfg.agent.connect_timeout = Duration::from_secs(5);
    env_log();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let net = AgentNetwork::new(cfg.agent.clone(), cfg.network.clone());
        let sandbox = SandboxRef::new(scope, sandbox);
        let req = PodNetRequest {
            sandbox: sandbox.clone(),
            netns,
            labels,
            exclusive: false,
        };
        match net.setup(&req).await {
            Ok(info) => println!(
                "READY {}",
                serde_json::json!({"interface": info.interface, "mac": info.mac, "addresses": info.addresses})
            ),
            Err(e) => {
                println!("FAILED {}", chain(&e));
                std::process::exit(1);
            }
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if let Err(e) = net.teardown(&sandbox).await {
            println!("TEARDOWN-FAILED {}", chain(&e));
            std::process::exit(1);
        }
        println!("DONE");
    });
}

/// The error with its causes, `outer: inner: innermost`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

fn env_log() {
    struct L;
    impl log::Log for L {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("{} {}", r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("NESTLESS_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_logger(&L).map(|()| log::set_max_level(level));
}
