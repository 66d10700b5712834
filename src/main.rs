//! The `ripple` command: runs a node, and small tools to try one.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod cli;

fn main() {
    // zeromq logs every failed reconnection attempt as a warning; the node
    // says "peer down" and "peer up" itself, once each.
    let filter = env_logger::Env::default().default_filter_or("info,zeromq=error");
    env_logger::Builder::from_env(filter).init();
    if let Err(error) = cli::run() {
        eprintln!("ripple: {error}");
        std::process::exit(1);
    }
}
