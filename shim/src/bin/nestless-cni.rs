//! `nestless-cni`: the CNI plugin binary (see the library's `cni` module).
//! Reads the CNI environment and the network configuration on stdin, prints
//! the result or the error document, exits non-zero on error.

use std::io::{Read, Write};

use nestless_shim::cni::{self, CniEnv};

fn main() {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = cni::CniError {
                code: 6,
                msg: format!("cannot read the network configuration from stdin: {e}"),
                details: String::new(),
            };
            println!("{}", err.to_json("1.1.0"));
            std::process::exit(1);
        }
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.0".into());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!(
                "{}",
                cni::CniError {
                    code: 100,
                    msg: format!("cannot start a runtime: {e}"),
                    details: String::new()
                }
                .to_json(&version)
            );
            std::process::exit(1);
        }
    };
    match rt.block_on(cni::run(&env, &stdin)) {
        Ok(out) => {
            let mut o = std::io::stdout();
            let _ = o.write_all(out.as_bytes());
            let _ = o.flush();
        }
        Err(e) => {
            // The spec: the error document on stdout, a short line on stderr.
            eprintln!("nestless-cni {}: {}", env.command, e.msg);
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}
