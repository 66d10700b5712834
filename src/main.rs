//! The `ripple` command: runs a node, and small tools to try one.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod cli;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(error) = cli::run() {
        eprintln!("ripple: {error}");
        std::process::exit(1);
    }
}
