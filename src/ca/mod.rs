//! The identity CA: a root and an intermediate (P-256), and X.509-SVIDs
//! issued from PKCS#10 CSRs, following the SPIFFE X509-SVID
//! specification. Pure: certificates are made for the `now` passed in.
//!
//! The broker decides *which* SPIFFE ID a caller proved (join token, service
//! account token, or its current SVID); this module only checks that the
//! CSR is well-formed, signed by its own P-256 key, and asks for no other
//! identity, then signs.

use crate::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use std::fmt;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;
/// How far before `now` certificates become valid, for clock skew.
pub const BACKDATE_SECS: u64 = 60;

/// Why the CA could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("CSR is larger than {MAX_CSR_LEN} bytes")]
    CsrTooLarge,
    /// Not a DER PKCS#10 request, its self-signature does not verify, or it
    /// carries extensions we do not accept.
    #[error("CSR is malformed or its signature does not verify")]
    CsrInvalid,
    /// The CSR's key is not an ECDSA P-256 key (id-ecPublicKey on
    /// prime256v1, an uncompressed point), or the CSR is not signed with
    /// ecdsa-with-SHA256.
    #[error(
        "CSR key must be ECDSA P-256 (an uncompressed point, signed with ecdsa-with-SHA256); found {found}"
    )]
    CsrKeyType {
        /// What the CSR has instead.
        found: String,
    },
    /// The CSR asks for a name other than the attested SPIFFE ID.
    #[error("CSR asks for identity {requested:?}, but the caller proved {attested}")]
    CsrIdentity {
        /// What the CSR asked for.
        requested: String,
        /// What the caller proved.
        attested: String,
    },
    /// The requested lifetime is zero or beyond what the issuing CA allows.
    #[error("certificate lifetime must be between 1s and {}", crate::clock::human_duration(*.max))]
    Lifetime {
        /// The cap.
        max: u64,
    },
    /// The CA's own certificate or key could not be loaded.
    #[error("CA material is invalid: {0}")]
    Material(String),
    /// Certificate generation failed inside the library.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}

/// Lifetimes of what the CA issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Root CA certificate.
    pub root_secs: u64,
    /// Intermediate CA certificate.
    pub intermediate_secs: u64,
    /// Longest X.509-SVID.
    pub max_svid_secs: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root_secs: 10 * 365 * 86_400,
            intermediate_secs: 90 * 86_400,
            max_svid_secs: 24 * 3_600,
        }
    }
}

/// An issued X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// Certificates between the leaf and the root (the intermediate), DER.
    pub chain_der: Vec<Vec<u8>>,
    /// Not valid after (Unix seconds).
    pub expires_at: u64,
    /// Serial number, lowercase hex (for inventory and audit).
    pub serial: String,
}

/// The CA: a root (whose key may be offline, i.e. absent) and the
/// intermediate that signs SVIDs.
pub struct Authority {
    trust_domain: String,
    root_der: Vec<u8>,
    intermediate_der: Vec<u8>,
    intermediate_expires_at: u64,
    intermediate: Issuer<'static, KeyPair>,
    lifetimes: Lifetimes,
}

/// A freshly signed intermediate CA.
struct NewIntermediate {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
    key_pem: Zeroizing<String>,
    expires_at: u64,
}

/// The CA's persistent parts: certificates in PEM, keys in PKCS#8 PEM
/// (wiped on drop). The store keeps these, encrypted.
pub struct CaMaterial {
    /// Root certificate.
    pub root_cert_pem: String,
    /// Root key: needed only to sign a new intermediate.
    pub root_key_pem: Option<Zeroizing<String>>,
    /// Intermediate certificate.
    pub intermediate_cert_pem: String,
    /// Intermediate key.
    pub intermediate_key_pem: Zeroizing<String>,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field(
                "root_key_pem",
                &self.root_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("intermediate_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn at(secs: u64) -> Result<OffsetDateTime, CaError> {
    let secs = i64::try_from(secs).map_err(|_| CaError::Generate("time out of range".into()))?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| CaError::Generate(e.to_string()))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Generate("random source failed".into()))?;
    // Positive and never zero-length when DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(
    td: &str,
    common_name: &str,
    not_before: u64,
    not_after: u64,
    path_len: Option<u8>,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tally");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}")
            .try_into()
            .map_err(|_| CaError::Generate("trust domain".into()))?,
    )];
    params.not_before = at(not_before)?;
    params.not_after = at(not_after)?;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Authority {
    /// Generates a new root and intermediate for `trust_domain`, valid from
    /// `now`. Returns the authority and the material to persist.
    ///
    /// # Errors
    /// [`CaError::Generate`] if key or certificate generation fails.
    pub fn generate(
        trust_domain: &SpiffeId,
        lifetimes: Lifetimes,
        now: u64,
    ) -> Result<(Self, CaMaterial), CaError> {
        let td = trust_domain.trust_domain().to_owned();
        let start = now.saturating_sub(BACKDATE_SECS);
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(
            &td,
            &format!("tally root CA {td}"),
            start,
            now + lifetimes.root_secs,
            None,
        )?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, root_key);
        let inter = Self::new_intermediate(&td, &root_issuer, lifetimes, now)?;
        let material = CaMaterial {
            root_cert_pem: root_cert.pem(),
            root_key_pem: Some(Zeroizing::new(root_issuer.key().serialize_pem())),
            intermediate_cert_pem: pem("CERTIFICATE", &inter.der),
            intermediate_key_pem: inter.key_pem,
        };
        let authority = Self {
            trust_domain: td,
            root_der: root_cert.der().to_vec(),
            intermediate_der: inter.der,
            intermediate_expires_at: inter.expires_at,
            intermediate: inter.issuer,
            lifetimes,
        };
        Ok((authority, material))
    }

    /// An authority under a root supplied by the operator (`--ca-cert`,
    /// `--ca-key`): checks the root is a CA certificate for this trust
    /// domain's use, currently valid, and matches its key, then makes a
    /// new intermediate under it.
    ///
    /// # Errors
    /// [`CaError::Material`] for an unusable root; [`CaError::Generate`].
    pub fn from_root(
        trust_domain: &SpiffeId,
        root_cert_pem: &str,
        root_key_pem: &str,
        lifetimes: Lifetimes,
        now: u64,
    ) -> Result<(Self, CaMaterial), CaError> {
        let bad = |what: String| CaError::Material(what);
        let root_der =
            pem_body(root_cert_pem).ok_or_else(|| bad("root certificate is not PEM".into()))?;
        let key = KeyPair::from_pem(root_key_pem)
            .map_err(|_| bad("root key is not a PEM private key rcgen can use".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|_| bad("root certificate does not parse".into()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("root key does not match the root certificate".into()));
        }
        if !parsed.is_ca() {
            return Err(bad(
                "the root certificate is not a CA (basicConstraints)".into()
            ));
        }
        let validity = parsed.validity();
        let (from, until) = (
            u64::try_from(validity.not_before.timestamp()).unwrap_or(u64::MAX),
            u64::try_from(validity.not_after.timestamp()).unwrap_or(0),
        );
        if now < from || now >= until {
            return Err(bad(format!(
                "the root certificate is not valid now (valid {from} to {until})"
            )));
        }
        let td = trust_domain.trust_domain().to_owned();
        let cert = rustls_pki_types::CertificateDer::from(root_der.as_slice());
        let root = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|_| bad("root certificate cannot issue".into()))?;
        // Never past the root's own end.
        let lifetimes = Lifetimes {
            intermediate_secs: lifetimes.intermediate_secs.min(until - now),
            ..lifetimes
        };
        let inter = Self::new_intermediate(&td, &root, lifetimes, now)?;
        let material = CaMaterial {
            root_cert_pem: pem("CERTIFICATE", &root_der),
            root_key_pem: Some(Zeroizing::new(root_key_pem.to_owned())),
            intermediate_cert_pem: pem("CERTIFICATE", &inter.der),
            intermediate_key_pem: inter.key_pem,
        };
        let authority = Self {
            trust_domain: td,
            root_der,
            intermediate_der: inter.der,
            intermediate_expires_at: inter.expires_at,
            intermediate: inter.issuer,
            lifetimes,
        };
        Ok((authority, material))
    }

    /// When the intermediate stops being valid.
    pub fn intermediate_expires_at(&self) -> u64 {
        self.intermediate_expires_at
    }

    /// The same root with a new intermediate (rotation). The bundle does
    /// not change, so relying parties need nothing new; SVIDs issued from
    /// then on carry the new intermediate in their chain.
    ///
    /// # Errors
    /// [`CaError::Material`] when `material` holds no root key (a root
    /// kept offline: make the intermediate there).
    pub fn rotate_intermediate(
        trust_domain: &SpiffeId,
        material: &CaMaterial,
        lifetimes: Lifetimes,
        now: u64,
    ) -> Result<(Self, CaMaterial), CaError> {
        let key = material.root_key_pem.as_ref().ok_or_else(|| {
            CaError::Material("the root key is not held by the broker; rotate the intermediate where the root key is".into())
        })?;
        Self::from_root(trust_domain, &material.root_cert_pem, key, lifetimes, now)
    }

    fn new_intermediate(
        td: &str,
        root: &Issuer<'_, KeyPair>,
        lifetimes: Lifetimes,
        now: u64,
    ) -> Result<NewIntermediate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let expires = now + lifetimes.intermediate_secs;
        let params = ca_params(
            td,
            &format!("tally intermediate CA {td}"),
            now.saturating_sub(BACKDATE_SECS),
            expires,
            Some(0),
        )?;
        let cert = params.signed_by(&key, root)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(NewIntermediate {
            issuer: Issuer::new(params, key),
            der: cert.der().to_vec(),
            key_pem,
            expires_at: expires,
        })
    }

    /// Loads an authority from persisted material.
    ///
    /// # Errors
    /// [`CaError::Material`] if a certificate or key does not parse, or the
    /// intermediate key does not match its certificate.
    pub fn load(
        trust_domain: &SpiffeId,
        material: &CaMaterial,
        lifetimes: Lifetimes,
    ) -> Result<Self, CaError> {
        let bad = |what: &str| CaError::Material(what.to_owned());
        let root_der =
            pem_body(&material.root_cert_pem).ok_or_else(|| bad("root certificate is not PEM"))?;
        let intermediate_der = pem_body(&material.intermediate_cert_pem)
            .ok_or_else(|| bad("intermediate certificate is not PEM"))?;
        let key = KeyPair::from_pem(&material.intermediate_key_pem)
            .map_err(|_| bad("intermediate key"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&intermediate_der)
            .map_err(|_| bad("intermediate certificate"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("intermediate key does not match its certificate"));
        }
        let intermediate_expires_at =
            u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
        let cert = rustls_pki_types::CertificateDer::from(intermediate_der.as_slice());
        let intermediate =
            Issuer::from_ca_cert_der(&cert, key).map_err(|_| bad("intermediate certificate"))?;
        Ok(Self {
            trust_domain: trust_domain.trust_domain().to_owned(),
            root_der,
            intermediate_der,
            intermediate_expires_at,
            intermediate,
            lifetimes,
        })
    }

    /// The trust bundle (root certificates), DER.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        vec![self.root_der.clone()]
    }

    /// The trust bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        pem("CERTIFICATE", &self.root_der)
    }

    /// The intermediate certificate, DER.
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    /// Issues an X.509-SVID for `id` from `csr_der`, valid from `now` for
    /// `ttl_secs` (never past the intermediate's own expiry).
    ///
    /// # Errors
    /// [`CaError`] for a bad CSR, a CSR asking for another identity, an ID
    /// outside this trust domain, or a lifetime out of range.
    pub fn issue_svid(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl_secs: u64,
        now: u64,
    ) -> Result<Svid, CaError> {
        if csr_der.len() > MAX_CSR_LEN {
            return Err(CaError::CsrTooLarge);
        }
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::CsrIdentity {
                requested: id.to_string(),
                attested: format!("an identity in spiffe://{}", self.trust_domain),
            });
        }
        if ttl_secs == 0 || ttl_secs > self.lifetimes.max_svid_secs {
            return Err(CaError::Lifetime {
                max: self.lifetimes.max_svid_secs,
            });
        }
        // The key first, from the key info itself: the signature
        // algorithm says nothing about the key's curve (ecdsa-with-SHA256
        // verifies with a P-384 key too), and the SVID labels the key it
        // certifies as P-256.
        require_p256_key(csr_der)?;
        // from_der verifies the CSR's self-signature (proof of possession)
        // with aws-lc-rs.
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|_| CaError::CsrInvalid)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::CsrKeyType {
                found: "a P-256 key signed with another algorithm than ecdsa-with-SHA256".into(),
            });
        }
        for san in &csr.params.subject_alt_names {
            let requested = match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                // Named for a person, not by the library's Debug.
                SanType::DnsName(name) => format!("DNS name {}", name.as_str()),
                SanType::Rfc822Name(mail) => format!("e-mail address {}", mail.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                // `SanType` may grow; any other kind is simply not a URI.
                _ => "a name that is not a URI".to_owned(),
            };
            if requested != id.as_str() {
                return Err(CaError::CsrIdentity {
                    requested,
                    attested: id.to_string(),
                });
            }
        }

        let expires_at = (now + ttl_secs).min(self.intermediate_expires_at);
        let params = leaf_params(id, &[], &[], expires_at, now)?;
        let serial = serial_hex(&params);
        let cert = params.signed_by(&csr.public_key, &self.intermediate)?;
        Ok(Svid {
            cert_der: cert.der().to_vec(),
            chain_der: vec![self.intermediate_der.clone()],
            expires_at,
            serial,
        })
    }
}

/// Refuses a CSR whose subject key is anything but an ECDSA P-256 key as
/// the SVID will describe it: algorithm id-ecPublicKey, parameters the
/// named curve prime256v1 (1.2.840.10045.3.1.7), and a 65-byte
/// uncompressed point (0x04, x, y). RSA, Ed25519, other curves and
/// compressed points are refused.
fn require_p256_key(csr_der: &[u8]) -> Result<(), CaError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    };
    use x509_parser::prelude::FromDer as _;
    let (rest, csr) =
        X509CertificationRequest::from_der(csr_der).map_err(|_| CaError::CsrInvalid)?;
    if !rest.is_empty() {
        return Err(CaError::CsrInvalid);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let refuse = |found: String| Err(CaError::CsrKeyType { found });
    // An OID from the request, bounded (it is the caller's text).
    let named = |oid: &x509_parser::der_parser::oid::Oid<'_>| {
        let mut text = oid.to_id_string();
        text.truncate(64);
        text
    };
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return refuse(if *algorithm == OID_PKCS1_RSAENCRYPTION {
            "an RSA key".into()
        } else if *algorithm == OID_SIG_ED25519 {
            "an Ed25519 key".into()
        } else {
            format!("a key of algorithm {}", named(algorithm))
        });
    }
    match spki.algorithm.parameters.as_ref().map(|p| p.as_oid()) {
        Some(Ok(curve)) if curve == OID_EC_P256 => {}
        Some(Ok(curve)) if curve == OID_NIST_EC_P384 => return refuse("a P-384 key".into()),
        Some(Ok(curve)) if curve == OID_NIST_EC_P521 => return refuse("a P-521 key".into()),
        Some(Ok(curve)) => return refuse(format!("an EC key on curve {}", named(&curve))),
        _ => return refuse("an EC key without a named curve".into()),
    }
    let point = &spki.subject_public_key;
    if point.unused_bits != 0 || point.data.len() != 65 || point.data.first() != Some(&0x04) {
        return refuse(format!(
            "a P-256 key that is not a 65-byte uncompressed point ({} bytes)",
            point.data.len()
        ));
    }
    Ok(())
}

/// A root CA the operator supplies (`--ca-cert`, `--ca-key`) instead of
/// one the broker generates. The key is wiped on drop and never printed.
#[derive(Clone)]
pub struct SuppliedRoot {
    /// The root certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for SuppliedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuppliedRoot")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A certificate with a key generated for it (the broker's own server
/// certificate, the admin credential): PEM, the key wiped on drop.
pub struct Credential {
    /// Leaf then intermediate, PEM.
    pub cert_chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: Zeroizing<String>,
    /// Not valid after (Unix seconds).
    pub expires_at: u64,
    /// Serial number, lowercase hex (for inventory and audit).
    pub serial: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("expires_at", &self.expires_at)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Generates a key and issues it a certificate for `id`, with `dns`
    /// and `ips` as further SANs (for a server), valid for `ttl_secs`.
    ///
    /// # Errors
    /// [`CaError`] as for [`Authority::issue_svid`].
    pub fn issue_credential(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[std::net::IpAddr],
        ttl_secs: u64,
        now: u64,
    ) -> Result<Credential, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::CsrIdentity {
                requested: id.to_string(),
                attested: format!("an identity in spiffe://{}", self.trust_domain),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let expires_at = (now + ttl_secs).min(self.intermediate_expires_at);
        let params = leaf_params(id, dns, ips, expires_at, now)?;
        let serial = serial_hex(&params);
        let cert = params.signed_by(&key, &self.intermediate)?;
        Ok(Credential {
            cert_chain_pem: format!(
                "{}{}",
                cert.pem(),
                pem("CERTIFICATE", &self.intermediate_der)
            ),
            key_pem: Zeroizing::new(key.serialize_pem()),
            expires_at,
            serial,
        })
    }
}

fn serial_hex(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| s.as_ref().iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}

/// The X509-SVID leaf profile (SPIFFE X509-SVID §4): the SPIFFE ID as the
/// one URI SAN (plus DNS/IP SANs for servers), not a CA, digitalSignature,
/// server and client auth; the subject is informational.
fn leaf_params(
    id: &SpiffeId,
    dns: &[String],
    ips: &[std::net::IpAddr],
    expires_at: u64,
    now: u64,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tally");
    if let Some(name) = dns.first() {
        dn.push(DnType::CommonName, name.as_str());
    }
    params.distinguished_name = dn;
    let uri = SanType::URI(
        id.as_str()
            .try_into()
            .map_err(|_| CaError::Generate("SPIFFE ID is not IA5".into()))?,
    );
    params.subject_alt_names = std::iter::once(Ok(uri))
        .chain(dns.iter().map(|d| {
            d.as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| CaError::Generate(format!("DNS name {d:?} is not IA5")))
        }))
        .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = at(now.saturating_sub(BACKDATE_SECS))?;
    params.not_after = at(expires_at)?;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The serial number of a certificate, hex, as [`Svid::serial`] gives it.
///
/// # Errors
/// A message when `cert_der` is not a certificate.
pub fn serial_of(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|_| "not an X.509 certificate".to_owned())?;
    Ok(cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The SPIFFE ID of an X.509-SVID: its one URI SAN.
///
/// # Errors
/// A message saying what is wrong (not a certificate, no or several URI
/// SANs, not a SPIFFE ID).
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|_| "not an X.509 certificate".to_owned())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| "malformed subjectAltName".to_owned())?
        .ok_or_else(|| "certificate has no subjectAltName".to_owned())?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri
            .parse()
            .map_err(|e| format!("URI SAN is not a SPIFFE ID: {e}")),
        (None, _) => Err("certificate has no URI SAN (SPIFFE ID)".to_owned()),
        (Some(_), Some(_)) => Err("certificate has more than one URI SAN".to_owned()),
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate_expires_at", &self.intermediate_expires_at)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// PEM-encodes one DER block.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block of `text`.
pub(crate) fn pem_body(text: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(text.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}
