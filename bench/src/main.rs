//! `nvmirror-bench`: see the crate docs and `docs/bench.md`.

use std::process::ExitCode;

use nvmirror_bench::cli::Cli;

fn main() -> ExitCode {
    // `plot` has its own parser; everything else is a job.
    if std::env::args().nth(1).as_deref() == Some("plot") {
        return match nvmirror_bench::plot::main(std::env::args().skip(1)) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nvmirror-bench plot: {e}");
                ExitCode::from(2)
            }
        };
    }
    let cli = Cli::parse_args();
    let mut stdout = std::io::stdout().lock();
    match nvmirror_bench::run_cli(&cli, &mut stdout) {
        // Like fio: the report is printed, and failed I/Os or failed verification make the
        // exit status non-zero.
        Ok(runs) if runs.iter().any(nvmirror_bench::run_failed) => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmirror-bench: {e}");
            ExitCode::from(2)
        }
    }
}
