fn main() -> std::process::ExitCode {
    edgechat::cli::main()
}
