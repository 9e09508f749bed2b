//! The `rehydra` binary; see [`rehydra::cli`].

fn main() -> std::process::ExitCode {
    rehydra::cli::main()
}
