//! `tally injector`: serve the admission webhook over HTTPS until
//! SIGTERM, or, with `--print-pod FILE`, print one pod as the webhook
//! would admit it. Settings are resolved by [`crate::injector::config`];
//! this shell reads the files and binds the listener.

use super::CliError;
use crate::injector::config::{InjectorConfig, InjectorFlags, Mode};
use crate::injector::files::{self, ReloadingBundle, ReloadingCert};
use crate::injector::server::Injector;
use crate::injector::{apply, pod, yaml};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// Runs `tally injector`.
///
/// # Errors
/// [`CliError::Usage`] for bad settings or files, or an address in use;
/// [`CliError::Failed`] when serving fails.
pub fn run(flags: InjectorFlags) -> Result<ExitCode, CliError> {
    let file_text = match &flags.config {
        Some(path) => Some((path.display().to_string(), read(path)?)),
        None => None,
    };
    let config = InjectorConfig::resolve(
        &flags,
        file_text.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    )
    .map_err(|errors| CliError::Usage(errors.join("\n  ")))?;
    let bundle = files::load_bundle(&config.trust_bundle)
        .map_err(|e| CliError::Usage(format!("trust_bundle {e}")))?;
    match config.mode.clone() {
        Mode::PrintPod(path) => print_pod(&config, bundle, &path),
        Mode::Serve {
            listen,
            tls_cert,
            tls_key,
            limits,
        } => {
            let cert = ReloadingCert::new(tls_cert, tls_key)
                .map_err(|e| CliError::Usage(format!("tls_cert/tls_key {e}")))?;
            let tls = files::server_config(Arc::new(cert)).map_err(CliError::Failed)?;
            let reloading = ReloadingBundle::new(config.trust_bundle.clone())
                .map_err(|e| CliError::Usage(format!("trust_bundle {e}")))?;
            let injector = Arc::new(Injector::new(config.template(bundle), Some(reloading)));
            let listen_on = crate::http::Listen::new("injector").tls(tls).limits(limits);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
                .block_on(async move {
                    let listener = tokio::net::TcpListener::bind(listen)
                        .await
                        .map_err(|e| super::broker::bind_error("--listen", &listen, &e))?;
                    let signal = super::shutdown_signal();
                    let at = listener.local_addr().map_or(listen, |a| a);
                    say!("tally injector: listening on https://{at} (POST /inject)");
                    crate::injector::server::serve(injector, listener, listen_on, signal)
                        .await
                        .map_err(|e| CliError::Failed(e.to_string()))?;
                    say!("tally injector: stopped");
                    Ok(ExitCode::SUCCESS)
                })
        }
    }
}

fn read(path: &Path) -> Result<String, CliError> {
    crate::config::read_text(path).map_err(|e| CliError::Usage(e.to_string()))
}

/// Prints the pod in `path` as the webhook would admit it (JSON), and the
/// warnings on standard error.
fn print_pod(config: &InjectorConfig, bundle: String, path: &Path) -> Result<ExitCode, CliError> {
    let name = path.display();
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(std::io::stdin(), yaml::MAX_LEN as u64 + 1),
            &mut text,
        )
        .map_err(|e| CliError::Usage(format!("reading standard input: {e}")))?;
        text
    } else {
        read(path)?
    };
    let mut doc = yaml::read(&text).map_err(|e| CliError::Usage(format!("{name}: {e}")))?;
    let kind = doc.get("kind").and_then(serde_json::Value::as_str);
    if kind != Some("Pod") {
        return Err(CliError::Usage(format!(
            "{name}: --print-pod takes a Pod (kind: Pod), not {}",
            kind.unwrap_or("a document without a kind")
        )));
    }
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let outcome = pod::inject(&config.template(bundle), &namespace, Some(&doc));
    for warning in &outcome.warnings {
        eprintln!("{}", crate::injector::review::warning(warning));
    }
    if let pod::Verdict::Skipped(why) = &outcome.verdict {
        eprintln!("tally injector: not injected ({})", why.label());
    }
    apply::apply(&mut doc, &outcome.patch)
        .map_err(|e| CliError::Failed(format!("applying the injector's own patch: {e}")))?;
    let text = serde_json::to_string_pretty(&doc)
        .map_err(|e| CliError::Failed(format!("printing the pod: {e}")))?;
    say!("{text}");
    Ok(ExitCode::SUCCESS)
}
