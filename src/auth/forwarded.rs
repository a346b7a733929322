//! Why a request described by a proxy in front (Envoy's ext_authz
//! `CheckRequest`) cannot be judged. The proxy, not the caller, tells
//! this sidecar what the request was; what it says must be whole and
//! agree with itself, and the request the app receives must be the one
//! judged, since this sidecar does not forward it.

/// Why a described request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardedError {
    /// No HTTP request attributes (`attributes.request.http`).
    #[error("the check names no HTTP request")]
    NoHttpRequest,
    /// No method.
    #[error("the check names no request method")]
    NoMethod,
    /// A scheme other than `http` or `https`.
    #[error("the request scheme is not http or https")]
    Scheme,
    /// The same header is described twice, differently (the joined
    /// `headers` against `header_map`, a value against its raw bytes, a
    /// pseudo-header against the request attributes).
    #[error("the check describes a header ({0}) two different ways")]
    Disagrees(&'static str),
    /// The path the app would receive is not the normalized path the
    /// rules judge (dot segments, percent-encodings): this sidecar cannot
    /// rewrite it, so it refuses it (Envoy's `normalize_path: true` sends
    /// paths already in normal form).
    #[error("the request path is not in normal form (dot segments or percent-encodings)")]
    NotNormalized,
    /// The peer certificate sent along does not verify against this
    /// sidecar's trust bundle, or does not name the peer the check claims.
    #[error("the peer certificate is not a mesh SVID for the claimed peer: {0}")]
    PeerUnverified(String),
}
