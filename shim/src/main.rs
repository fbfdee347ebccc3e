//! `containerd-shim-nestless-v2`: started by containerd (`start`, `delete`,
//! or serving with `-socket`); see the library's `shim` module.

use nestless_shim::shim::{crate_config, NestlessShim, RUNTIME_NAME};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!(
            "{} {} ({RUNTIME_NAME})",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    // One thread: a shim serves one pod, and its work is waiting.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_NAME}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<NestlessShim>(
        RUNTIME_NAME,
        Some(crate_config()),
    ));
}
