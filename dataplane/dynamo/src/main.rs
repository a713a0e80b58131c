//! `dynamo`: wires the CLI to the data-plane subsystems. All logic lives in the library.

use std::io::IsTerminal;

use clap::Parser;
use dynamo_dataplane::{
    cli::{Cli, Command},
    run, serve, transfer_bench,
};

// The frontend allocates per request and per chunk (JSON, tokenizer, HTTP/2 frames); glibc's
// malloc was a quarter of its CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn,dynamo_dataplane=info,dynamo_frontend=info,dynamo_sidecar=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DYN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        // The frontend parses, tokenizes and streams for many clients: use every core.
        // Long prompts are tokenized on the blocking pool; more tokenizer threads than cores only
        // adds per-thread allocator heaps (peak RSS), not throughput.
        Command::Frontend(args) => {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            let mut builder = match args.threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(if n == 0 { cores } else { n });
                    b
                }
            };
            builder
                .max_blocking_threads(cores.max(2))
                .enable_all()
                .build()?
                .block_on(run::frontend(args))
        }
        // A sidecar drives one engine loop: one thread is enough and cheapest.
        Command::Sidecar(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run::sidecar(args)),
        Command::Serve(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve::run(args)),
        // The load generator parses many concurrent streams: use every core.
        Command::Bench(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(dynamo_bench::main(args)),
        Command::Profile(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(dynamo_bench::profile::main(args)),
        Command::Ideal(args) => serve::planner::ideal(&args),
        // One thread on each side, as a sidecar moves KV.
        Command::BenchTransfer(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(transfer_bench::run(args)),
    }
}
