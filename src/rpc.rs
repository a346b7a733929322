//! What every gRPC client of the broker (the sidecar, `tally ctl`) shares:
//! the words for a refusal ([`refusal_text`]) and for a connection that
//! failed ([`ConnectFailure`]). tonic's own `Display` for a status starts
//! with boilerplate ("Client specified an invalid argument: …") and its
//! transport errors hide the TLS reason two sources down; a person needs
//! the broker's sentence, and to know whether waiting will help.

/// A broker's `status` as a person should read it: the broker's own
/// message, after a short word only where the message alone would not say
/// what kind of "no" it is.
pub fn refusal_text(status: &tonic::Status) -> String {
    use tonic::Code;
    // Every code listed: a new one must be placed, not labelled by default.
    let word = match status.code() {
        Code::PermissionDenied => Some("permission denied"),
        Code::Unauthenticated => Some("not authenticated"),
        Code::Unavailable => Some("unavailable"),
        Code::DeadlineExceeded => Some("timed out"),
        Code::Unimplemented => Some("not supported by this broker"),
        Code::Cancelled => Some("cancelled"),
        Code::Internal | Code::Unknown | Code::DataLoss => Some("broker error"),
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::ResourceExhausted => None,
    };
    let message = status.message().trim();
    match (word, message.is_empty()) {
        (Some(word), true) => word.to_owned(),
        (None, true) => status.code().description().to_owned(),
        (Some(word), false) => format!("{word}: {message}"),
        (None, false) => message.to_owned(),
    }
}

/// Whether a status from the broker means "try again later" rather than
/// "no": the broker was down, slow, or lost the connection mid-call. A
/// dropped connection arrives as `Cancelled` (the HTTP/2 stream was reset
/// while the broker shut down), which the broker never sends as a verdict.
pub fn is_transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Internal
            | Code::Unknown
            | Code::Aborted
    )
}

/// Why a connection to the broker could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// The broker's certificate does not verify with the trust bundle
    /// given: the bundle is another broker's (or the address is). Waiting
    /// will not help; the configuration must change.
    #[error("its certificate does not verify with this bundle ({reason})")]
    WrongBundle {
        /// What TLS found, in words ("issued by a CA this bundle does not
        /// hold").
        reason: String,
    },
    /// The certificate verifies but is not for the host name dialled.
    #[error("its certificate is not for this host name ({reason})")]
    WrongName {
        /// What TLS said.
        reason: String,
    },
    /// Anything else: refused, timed out, reset, not TLS. It may work later.
    #[error("{0}")]
    Unreachable(String),
}

impl ConnectFailure {
    /// Classifies a failed connect by the TLS error in its source chain,
    /// if there is one.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        use rustls::CertificateError as C;
        let mut text = error.to_string();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = next {
            if let Some(tls) = tls_error(e) {
                if let rustls::Error::InvalidCertificate(cert) = tls {
                    let reason = certificate_words(cert);
                    return match cert {
                        C::BadSignature
                        | C::UnknownIssuer
                        | C::BadEncoding
                        | C::InvalidPurpose
                        | C::UnhandledCriticalExtension => Self::WrongBundle { reason },
                        C::NotValidForName | C::NotValidForNameContext { .. } => {
                            Self::WrongName { reason }
                        }
                        // Expiry and revocation can change with time (a
                        // renewed certificate): not a configuration error.
                        _ => Self::Unreachable(format!("{text} ({tls})")),
                    };
                }
                return Self::Unreachable(format!("{text} ({tls})"));
            }
            next = e.source();
            if let Some(source) = next {
                let more = source.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
            }
        }
        Self::Unreachable(text)
    }
}

/// What a certificate error means, in words (rustls names them as Rust
/// variants: `UnknownIssuer`).
fn certificate_words(error: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match error {
        C::BadSignature => "signed by a key this bundle does not hold".into(),
        C::UnknownIssuer => "issued by a CA this bundle does not hold".into(),
        C::BadEncoding => "the certificate does not parse".into(),
        C::InvalidPurpose => "the certificate is not for a TLS server".into(),
        C::UnhandledCriticalExtension => {
            "the certificate has a critical extension this client does not know".into()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "the certificate is for another name".into()
        }
        other => other.to_string(),
    }
}

/// The rustls error `e` is or wraps (an `io::Error`'s `source` skips the
/// error it carries, so look inside it too).
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    inner.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn a_refusal_reads_as_the_brokers_message_without_tonic_boilerplate() {
        let s = Status::invalid_argument("ttl 48h is longer than the 24h maximum");
        assert_eq!(refusal_text(&s), "ttl 48h is longer than the 24h maximum");
        let s = Status::failed_precondition("no policy version 9");
        assert_eq!(refusal_text(&s), "no policy version 9");
        let s = Status::permission_denied("not an admin");
        assert_eq!(refusal_text(&s), "permission denied: not an admin");
        let s = Status::new(Code::Unavailable, "");
        assert_eq!(refusal_text(&s), "unavailable");
        let s = Status::new(Code::NotFound, " ");
        assert_eq!(refusal_text(&s), Code::NotFound.description());
    }

    #[test]
    fn a_connection_lost_mid_call_is_an_outage_and_a_verdict_is_not() {
        // tonic reports a stream reset by a broker shutting down as
        // Cancelled; the sidecar must wait for it, not pass it on as a "no".
        for code in [Code::Unavailable, Code::Cancelled, Code::DeadlineExceeded] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Unauthenticated,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }

    #[test]
    fn a_tls_error_inside_an_io_error_is_found() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
        let io = std::io::Error::other(tls);
        assert!(matches!(
            ConnectFailure::of(&io),
            ConnectFailure::WrongBundle { reason } if reason == "signed by a key this bundle does not hold"
        ));
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            ConnectFailure::of(&io),
            ConnectFailure::Unreachable(_)
        ));
    }
}
