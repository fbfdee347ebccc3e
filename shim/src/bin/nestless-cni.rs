//! `nestless-cni`: the CNI plugin binary; everything is in the library's
//! `cni` module.

fn main() -> std::process::ExitCode {
    nestless_shim::cni::main()
}
