use std::process::ExitCode;

fn main() -> ExitCode {
    // Built for x86-64-v3 (see .cargo/config.toml): say so instead of dying of SIGILL later.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        eprintln!(
            "error: this edgechat was built for CPUs with AVX2 and FMA, which this one lacks; \
             rebuild it with RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
        );
        return ExitCode::FAILURE;
    }
    edgechat::cli::main()
}
