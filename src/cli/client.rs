//! `tally client`: the sidecar's local API from a shell. Prints the
//! answer (and, for `authorize`, a ready `curl` line); `--json` prints the
//! API's JSON as is. A refusal from the sidecar is printed as it came
//! and the exit code says what kind it was.

use super::CliError;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use std::path::PathBuf;
use std::process::ExitCode;

/// Largest answer read from the socket.
const MAX_ANSWER: usize = 64 * 1024;

/// Arguments shared by every `tally client` command.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The sidecar's local API socket [default: as `tally sidecar`].
    #[arg(long, env = "TALLY_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Print the API's JSON answer unchanged.
    #[arg(long, global = true)]
    json: bool,
    /// What to ask.
    #[command(subcommand)]
    command: ClientCommand,
}

/// `tally client` commands.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// A DPoP-bound access token for an audience (GET /v1/token): the
    /// token alone on stdout (so `$(…)` or `> file` takes it), its type,
    /// scope and expiry on stderr.
    Token {
        /// The audience: a SPIFFE ID or URI.
        #[arg(long)]
        audience: String,
        /// Scopes, space separated [default: what the policy grants].
        #[arg(long, default_value = "", hide_default_value = true)]
        scope: String,
    },
    /// Authorization and DPoP header values for one request
    /// (POST /v1/authorize), and a curl line that sends it.
    Authorize {
        /// HTTP method, e.g. POST.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The full request URL.
        #[arg(long)]
        url: String,
        /// The audience [default: from the sidecar's service map].
        #[arg(long)]
        audience: Option<String>,
        /// Scopes, space separated [default: what the policy grants].
        #[arg(long)]
        scope: Option<String>,
    },
    /// This workload's SPIFFE ID and SVID expiry (GET /v1/identity).
    Identity,
}

pub(super) fn run(args: ClientArgs) -> Result<ExitCode, CliError> {
    let socket = args.socket.unwrap_or_else(super::sidecar::default_socket);
    let (method, target, body) = match &args.command {
        ClientCommand::Token { audience, scope } => {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("audience", audience)
                .append_pair("scope", scope)
                .finish();
            ("GET", format!("/v1/token?{query}"), None)
        }
        ClientCommand::Authorize {
            method,
            url,
            audience,
            scope,
        } => {
            let mut ask = serde_json::json!({ "method": method.to_ascii_uppercase(), "url": url });
            if let Some(a) = audience {
                ask["audience"] = a.clone().into();
            }
            if let Some(s) = scope {
                ask["scope"] = s.clone().into();
            }
            ("POST", "/v1/authorize".to_owned(), Some(ask.to_string()))
        }
        ClientCommand::Identity => ("GET", "/v1/identity".to_owned(), None),
    };
    let (status, answer) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(call(&socket, method, &target, body))?;
    if !(200..300).contains(&status) {
        let error = answer["error"].as_str().unwrap_or("error");
        let description = answer["error_description"].as_str().unwrap_or("");
        let message = format!("the sidecar answered {status} {error}: {description}");
        return Err(match status {
            400 => CliError::Usage(message),
            503 => CliError::Unavailable(message),
            _ => CliError::Failed(message),
        });
    }
    if args.json {
        say!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    match &args.command {
        ClientCommand::Token { .. } => {
            say!("{}", text(&answer, "access_token"));
            eprintln!(
                "token_type {}, scope {:?}, expires_at {}; use it with a fresh DPoP proof per request (`tally client authorize`)",
                text(&answer, "token_type"),
                text(&answer, "scope"),
                expiry(&answer)
            );
        }
        ClientCommand::Authorize { method, url, .. } => {
            let (authorization, dpop) = (text(&answer, "authorization"), text(&answer, "dpop"));
            say!("Authorization: {authorization}");
            say!("DPoP: {dpop}");
            say!(
                "curl -X {} -H {} -H {} {}",
                shell_quote(&method.to_ascii_uppercase()),
                shell_quote(&format!("Authorization: {authorization}")),
                shell_quote(&format!("DPoP: {dpop}")),
                shell_quote(url)
            );
        }
        ClientCommand::Identity => {
            say!("spiffe_id:    {}", text(&answer, "spiffe_id"));
            say!("trust_domain: {}", text(&answer, "trust_domain"));
            say!("expires_at:   {}", expiry(&answer));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn text<'a>(answer: &'a serde_json::Value, key: &str) -> &'a str {
    answer[key].as_str().unwrap_or("")
}

/// `text` in single quotes for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// One request to the local API; (status, JSON answer).
pub(super) async fn call(
    socket: &std::path::Path,
    method: &str,
    target: &str,
    body: Option<String>,
) -> Result<(u16, serde_json::Value), CliError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::Unavailable(format!(
            "cannot reach the sidecar at {}: {e} (is `tally sidecar` running? --socket)",
            socket.display()
        ))
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, "tally")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = response.status().as_u16();
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| CliError::Failed(format!("reading the sidecar's answer: {e}")))?
        .to_bytes();
    let answer = serde_json::from_slice(&bytes)
        .map_err(|e| CliError::Failed(format!("the sidecar's answer is not JSON: {e}")))?;
    Ok((status, answer))
}

/// The answer's `expires_at` (Unix seconds) as RFC 3339, as every time the
/// CLI prints.
fn expiry(answer: &serde_json::Value) -> String {
    answer["expires_at"]
        .as_i64()
        .map_or_else(|| "-".to_owned(), super::ctl::output::when)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
