//! The state loader: any bytes as `state.json`, under a fixed config.
//! Loaded as a start loads it (imported into a fresh database, then read
//! back): refused with a report of what does not fit, or released; then
//! the start-up recovery and a guest's first requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nestless_fuzz::{agent, config, exercise, fresh_state, runtime, VMS};
use nestless_netagent::stale::{self, StalePolicy};

fuzz_target!(|data: &[u8]| {
    fresh_state(data);
    let config = config();
    if let Err(e) = stale::load(&config, StalePolicy::Refuse) {
        // The refusal's text is what the operator reads: build it too.
        let _ = e.to_string();
    }
    let Ok(agent) = agent(config, StalePolicy::Release) else {
        return;
    };
    runtime().block_on(async {
        let _ = agent.recover().await;
        for vm in VMS {
            exercise(&agent, vm).await;
        }
    });
});
