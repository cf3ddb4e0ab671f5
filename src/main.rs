//! The labctl binary: parse, run, map errors to exit codes. Nothing else.

use clap::Parser;

fn main() {
    let cli = labctl::cli::Cli::parse();
    let code = match labctl::cli::run(cli) {
        Ok(code) => code.code(),
        Err(err) => {
            if is_broken_pipe(&err) {
                std::process::exit(0);
            }
            eprintln!("error: {err:#}");
            err.exit_code().code()
        }
    };
    std::process::exit(code);
}

fn is_broken_pipe(err: &labctl::error::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
