use std::process::ExitCode;

fn main() -> ExitCode {
    crm_sync::cli::main()
}
