//! Domain XML as libvirtd returns it, any text: the libvirt backend's parsers (the
//! nestless metadata element, the `<vsock>` CID, the agent's NICs by user alias) give a
//! value or an error naming the domain, never a panic; a VM the metadata describes then
//! goes through the configuration's checks as a registered VM, as discovery registers it.
#![no_main]

use std::{path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use nestless_netagent::{backend::domxml, config::Config};

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let _ = domxml::agent_nics("d", xml).map_err(|e| e.to_string());
    let _ = domxml::vsock_cid("d", xml).map_err(|e| e.to_string());
    match domxml::domain_spec("d", xml, "qemu:///system") {
        Ok(Some(spec)) => {
            static BASE: OnceLock<Config> = OnceLock::new();
            let base = BASE.get_or_init(|| {
                Config::parse(Path::new("fuzz.toml"), nestless_fuzz::CONFIG)
                    .expect("the fixed config loads")
            });
            if let Err(e) = base.with_registered(Path::new("vms.json"), &[spec]) {
                let _ = e.to_string();
            }
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
