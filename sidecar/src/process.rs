//! What every kube-zerocopy binary does around its work: logs to stderr (JSON with
//! `KZC_LOG_FORMAT=json`, filtered by `RUST_LOG`), and on error a one-line message, the
//! container's termination message (what Kubernetes shows), and exit code 1.

pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KZC_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Ends the process on an error, reporting it where a user and Kubernetes look.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        let message = format!("{e:#}");
        eprintln!("error: {message}");
        // Outside a pod the file does not exist and this fails silently, as it should.
        let _ = std::fs::write("/dev/termination-log", &message);
        std::process::exit(1);
    }
}
