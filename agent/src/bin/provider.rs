//! `provider`: the operator's command line and daemon.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    provider::cli::main()
}
