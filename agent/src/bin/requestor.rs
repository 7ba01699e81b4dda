//! `requestor`: submit signed manifests and ExeScript batches to providers.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    provider::requestor::main()
}
