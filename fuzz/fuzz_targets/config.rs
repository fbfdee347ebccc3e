//! The config loader: any text as `netagent.toml`. A config that loads is
//! then used as the agent uses it: address allocators for every network,
//! an agent over fakes (its state dir replaced by the scratch dir), its
//! start-up recovery, and a NIC and a Hostlo part for its first VMs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nestless_fuzz::{agent, clear_state, exercise, runtime, scratch};
use nestless_netagent::{config::Config, ipam::Ipam, stale::StalePolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = match Config::parse(std::path::Path::new("fuzz.toml"), text) {
        Ok(c) => c,
        Err(e) => {
            // The error's text is what the operator reads: build it too.
            let _ = e.to_string();
            return;
        }
    };
    for net in config.networks.values() {
        let mut ipam = Ipam::new(net);
        for _ in 0..3 {
            if let Ok(a) = ipam.allocate() {
                ipam.ipv6_for(a);
            }
        }
    }
    // Never where the fuzzed text says: the agent writes its state file.
    config.agent.state_dir = scratch().to_path_buf();
    clear_state();
    // A few VMs are enough to use the config; thousands would only be slow.
    let vms: Vec<String> = config.vms.iter().take(4).map(|v| v.name.clone()).collect();
    let Ok(agent) = agent(config, StalePolicy::Refuse) else {
        panic!("the agent does not start on an empty state");
    };
    runtime().block_on(async {
        let _ = agent.recover().await;
        for vm in &vms {
            exercise(&agent, vm).await;
        }
    });
});
