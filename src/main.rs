use std::process::ExitCode;

fn main() -> ExitCode {
    // Like any Unix tool, stop quietly when the reader of our output goes away (`crm-sync runs | head`);
    // Rust ignores SIGPIPE by default and `println!` would panic on the broken pipe.
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    crm_sync::cli::main()
}
