//! What the Admin service reads for governance: the audit chain's check,
//! audit queries, and the leaked-token lookup.

use super::{Broker, BrokerError};
use crate::audit::{AuditRecord, ChainBreak, ChainVerifier};
use crate::store::{AuditFilter, IssuedToken};

/// Records read per page while verifying.
const VERIFY_PAGE: u32 = 2_000;
/// Most records a token lookup returns.
pub const LOOKUP_RECORDS: u32 = 1_000;

/// The outcome of [`Broker::verify_audit`].
#[derive(Debug)]
pub struct AuditVerification {
    /// Records checked.
    pub checked: u64,
    /// The head the store recorded with its last write.
    pub head: crate::store::AuditHead,
    /// The first break, if any.
    pub problem: Option<ChainBreak>,
}

/// What [`Broker::lookup_token`] found.
#[derive(Debug)]
pub struct TokenLookup {
    /// The inventory record.
    pub token: IssuedToken,
    /// Whether a revocation in force covers it.
    pub revoked: bool,
    /// Every audit record naming it, oldest first.
    pub records: Vec<AuditRecord>,
    /// The inventory had pruned it (past retention): what is known comes
    /// from its issuance record in the audit log.
    pub from_audit: bool,
}

impl Broker {
    /// Checks the whole audit chain against the recorded head. Records
    /// written while it runs are left for the next check: it stops at the
    /// head it read first.
    ///
    /// # Errors
    /// [`BrokerError::Store`]; a broken chain is an `Ok` with a problem.
    pub async fn verify_audit(&self) -> Result<AuditVerification, BrokerError> {
        let head = self.store.audit_head().await?;
        let mut verifier = ChainVerifier::anchored(head.chain_from, head.anchor);
        let mut after = head.chain_from.saturating_sub(1);
        let problem = 'check: loop {
            let page = self.store.audit_after(after, VERIFY_PAGE).await?;
            let done = page.len() < VERIFY_PAGE as usize;
            let read_from = after;
            for record in page.iter().take_while(|r| r.seq <= head.seq) {
                if let Err(e) = verifier.push_record(record) {
                    break 'check Some(e);
                }
                after = record.seq;
            }
            // Stop at the head, at the end, or when a page brought nothing
            // up to the head (only records past it: the head check then
            // says what is missing). Records past the head belong to
            // writes after it was read.
            if done || after >= head.seq || after == read_from {
                break verifier.finish(head.seq, &head.hash).err();
            }
        };
        Ok(AuditVerification {
            checked: verifier.checked(),
            head,
            problem,
        })
    }

    /// Removes the audit records up to `through`, which the caller has
    /// archived (`expect` is the hash of record `through` in its copy), and
    /// audits that it did, with where the archive is kept if the admin
    /// said. Returns how many records went.
    ///
    /// # Errors
    /// [`BrokerError::Store`], with [`crate::store::StoreError::Refused`]
    /// for a wrong range or hash.
    pub async fn truncate_audit(
        &self,
        through: u64,
        expect: &crate::audit::ChainHash,
        archive: Option<&str>,
        actor: &crate::identity::SpiffeId,
    ) -> Result<u64, BrokerError> {
        use crate::audit::{AuditEvent, AuditKind, Outcome};
        let gone = self.store.truncate_audit(through, expect).await?;
        let mut event = AuditEvent::new(AuditKind::AuditTruncate, Outcome::Ok, self.clock.now())
            .actor(actor)
            .field("through", through)
            .field("anchor", expect.to_string())
            .field("removed", gone);
        if let Some(archive) = archive {
            event = event.field("archive", archive);
        }
        self.audit(event).await;
        tracing::warn!(through, removed = gone, admin = %actor, "archived audit records removed from the store");
        Ok(gone)
    }

    /// Audit records matching `filter`, at most `limit`.
    ///
    /// # Errors
    /// [`BrokerError::Store`].
    pub async fn query_audit(
        &self,
        filter: &AuditFilter,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, BrokerError> {
        Ok(self.store.audit_query(filter, limit).await?)
    }

    /// From a token string: its inventory record (only if the broker
    /// issued exactly this token), whether it is revoked, and every audit
    /// record naming it.
    ///
    /// # Errors
    /// [`BrokerError::Store`].
    pub async fn lookup_token(&self, token: &str) -> Result<Option<TokenLookup>, BrokerError> {
        let found = self.find_token(token).await?;
        let Some(jti) = found
            .as_ref()
            .map(|(t, _)| t.jti.clone())
            .or_else(|| super::revoke::unverified_jti(token))
        else {
            return Ok(None);
        };
        let filter = AuditFilter {
            jti: Some(jti),
            ..AuditFilter::default()
        };
        let records = self.store.audit_query(&filter, LOOKUP_RECORDS).await?;
        if let Some((token, revoked)) = found {
            return Ok(Some(TokenLookup {
                token,
                revoked,
                records,
                from_audit: false,
            }));
        }
        // Pruned from the inventory: its issuance record has the same
        // keyed hash, so a forgery still finds nothing.
        let hmac = crate::audit::hex(&self.token_hmac(token));
        let issuance = [
            crate::audit::AuditKind::TokenIssue.as_str(),
            crate::audit::AuditKind::JwtSvidIssue.as_str(),
            crate::audit::AuditKind::WitIssue.as_str(),
        ];
        let Some(issued) = records
            .iter()
            .filter(|r| issuance.contains(&r.kind.as_str()))
            .filter_map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.line)
                    .ok()
                    .map(|v| (r, v))
            })
            .find(|(_, v)| v["outcome"] == "ok" && v["token_hmac"] == hmac.as_str())
            .and_then(|(r, v)| issued_from_record(r, &v))
        else {
            return Ok(None);
        };
        let set = self.revocations_in_force().await?;
        Ok(Some(TokenLookup {
            revoked: super::revoke::is_revoked(&set, &issued),
            token: issued,
            records,
            from_audit: true,
        }))
    }
}

/// An inventory record rebuilt from a token's issuance audit record (an
/// access token's `token.issue`, a JWT-SVID's `jwt_svid.issue`, a WIT's
/// `wit.issue`).
fn issued_from_record(record: &AuditRecord, v: &serde_json::Value) -> Option<IssuedToken> {
    use crate::token::TokenKind;
    let text = |k: &str| v[k].as_str().map(str::to_owned);
    fn parse<T: std::str::FromStr>(v: &serde_json::Value, k: &str) -> Option<T> {
        v[k].as_str()?.parse().ok()
    }
    let token_hmac = crate::audit::unhex32(v["token_hmac"].as_str()?)?;
    let kind = if record.kind == crate::audit::AuditKind::JwtSvidIssue.as_str() {
        TokenKind::JwtSvid
    } else if record.kind == crate::audit::AuditKind::WitIssue.as_str() {
        TokenKind::Wit
    } else {
        TokenKind::Access
    };
    // A WIT's record names no class: its inventory row is always `service`.
    let class = match kind {
        TokenKind::Wit => crate::token::TokenClass::Service,
        _ => parse(v, "class")?,
    };
    let (aud, scope, jkt) = match kind {
        TokenKind::Access => (
            vec![parse(v, "audience")?],
            parse(v, "scope")?,
            Some(parse(v, "jkt")?),
        ),
        TokenKind::JwtSvid => (
            v["audience"]
                .as_array()?
                .iter()
                .map(|a| a.as_str()?.parse().ok())
                .collect::<Option<Vec<_>>>()?,
            crate::token::Scopes::default(),
            None,
        ),
        TokenKind::Wit => (
            Vec::new(),
            crate::token::Scopes::default(),
            Some(parse(v, "jkt")?),
        ),
    };
    Some(IssuedToken {
        jti: text("jti")?,
        kind,
        sub: parse(v, "actor")?,
        aud,
        scope,
        class,
        jkt,
        iat: record.at,
        exp: v["exp"].as_u64()?,
        kid: text("kid")?,
        token_hmac,
    })
}

/// Why a policy change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyChangeError {
    /// This broker serves its policy file; stored versions cannot win.
    #[error(
        "this broker serves the policy file {0} (policy source: file): edit the file, or run the broker with --policy-source store to manage versions here"
    )]
    FileMode(String),
    /// The document does not parse or is for another trust domain.
    #[error("{0}")]
    Invalid(String),
    /// No such version.
    #[error("no policy version {0}")]
    NoVersion(u64),
    /// The store failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A stored policy change.
#[derive(Debug)]
pub struct PolicyChange {
    /// The version now served (the existing one when nothing changed).
    pub version: u64,
    /// What changed from the version served before.
    pub diff: crate::policy::diff::PolicyDiff,
}

/// Most policy versions a history lists.
pub const MAX_HISTORY: u32 = 1_000;

impl Broker {
    /// The policy to serve at start, by [`PolicySource`]; records a new
    /// version when it is one.
    pub(super) async fn resolve_policy(
        settings: &super::BrokerSettings,
        store: &crate::store::Store,
        now: u64,
    ) -> Result<crate::policy::Policy, BrokerError> {
        use super::PolicySource;
        let latest = store.policy_version(None).await?;
        let given = settings.policy_yaml.as_deref();
        // Every policy served is a stored version: rules given without
        // their text could not be stored, so they are refused.
        let no_rules = crate::policy::Policy::parse(&format!(
            "trust_domain: {}\n",
            settings.trust_domain.trust_domain()
        ))
        .ok();
        if given.is_none() && no_rules.as_ref() != Some(&settings.policy) {
            return Err(BrokerError::Config(
                "a policy given without its text cannot be stored: set policy_yaml (BrokerSettings::with_policy)".into(),
            ));
        }
        match (&settings.policy_source, latest) {
            (
                PolicySource::File {
                    name,
                    overrides_applied,
                },
                latest,
            ) => {
                let Some(text) = given else {
                    return Ok(settings.policy.clone());
                };
                if let Some(v) = &latest
                    && v.yaml != text
                    && matches!(v.source.as_str(), "apply" | "rollback")
                    && !overrides_applied
                {
                    return Err(BrokerError::Config(format!(
                        "the store's policy version {} was set by {} with `tally ctl policy {}` and differs from {name}: \
                         run with --policy-source store to keep serving it (and drop --policy), \
                         or --policy-source file to make {name} win",
                        v.version, v.author, v.source
                    )));
                }
                if latest.as_ref().is_none_or(|v| v.yaml != text) {
                    store
                        .insert_policy_version(&format!("file:{name}"), "file", "", text, now)
                        .await?;
                }
                Ok(settings.policy.clone())
            }
            (PolicySource::Store, Some(v)) => {
                if let Some(text) = given
                    && text != v.yaml
                {
                    return Err(BrokerError::Config(format!(
                        "--policy differs from the stored policy version {} (policy source: store): \
                         drop --policy to serve the stored version, or apply the file with `tally ctl policy apply`",
                        v.version
                    )));
                }
                crate::policy::Policy::parse(&v.yaml).map_err(|e| {
                    BrokerError::Config(format!("stored policy version {}: {e}", v.version))
                })
            }
            (PolicySource::Store, None) => {
                if let Some(text) = given {
                    store
                        .insert_policy_version("seed", "seed", "given at start", text, now)
                        .await?;
                }
                Ok(settings.policy.clone())
            }
        }
    }

    /// Serves the policy file's new text (`read`, or why it could not be
    /// read): parsed, stored as a version when it differs from the newest,
    /// pushed to sidecars; counted and audited (`policy.reload`, with the
    /// diff) either way. A text that does not parse leaves the running
    /// policy in place.
    ///
    /// # Errors
    /// Every problem, as text for the log.
    pub async fn reload_policy_file(
        &self,
        name: &str,
        read: Result<String, String>,
    ) -> Result<(), String> {
        use crate::audit::{AuditEvent, AuditKind, Outcome};
        use crate::policy::diff::{MAX_AUDIT_DIFF, diff};
        let now = self.clock.now();
        let result = async {
            let text = read?;
            let policy = crate::policy::Policy::parse(&text)
                .map_err(|e| e.with_file(name.to_owned()).to_string())?;
            let latest = self
                .store
                .policy_version(None)
                .await
                .map_err(|e| e.to_string())?;
            self.set_policy(policy).await.map_err(|e| e.to_string())?;
            let old = latest.as_ref().map_or("", |v| v.yaml.as_str());
            let change = diff(old, &text, "previous", name);
            if change.is_empty() {
                return Ok((latest.map_or(0, |v| v.version), change));
            }
            let version = self
                .store
                .insert_policy_version(&format!("file:{name}"), "file", "", &text, now)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((version, change))
        }
        .await;
        let event = match &result {
            Ok((version, change)) => {
                self.metrics.policy_reloads.inc(&["ok"]);
                AuditEvent::new(AuditKind::PolicyReload, Outcome::Ok, now)
                    .field("version", *version)
                    .field("added", change.added)
                    .field("removed", change.removed)
                    .field("diff", change.text_within(MAX_AUDIT_DIFF))
            }
            Err(errors) => {
                self.metrics.policy_reloads.inc(&["error"]);
                AuditEvent::new(AuditKind::PolicyReload, Outcome::Error, now)
                    .field("detail", errors.as_str())
            }
        };
        self.audit(event.field("source", name)).await;
        result.map(|_| ())
    }

    /// Stores `yaml` as the new policy (after checking it), audits the
    /// change with its diff, and pushes the access rules to every sidecar.
    /// An identical document changes nothing.
    ///
    /// # Errors
    /// [`PolicyChangeError`].
    pub async fn apply_policy(
        &self,
        yaml: &str,
        actor: &crate::identity::SpiffeId,
        comment: &str,
    ) -> Result<PolicyChange, PolicyChangeError> {
        self.change_policy(yaml, actor, "apply", comment, None)
            .await
    }

    /// Serves an earlier version again, stored as a new version.
    ///
    /// # Errors
    /// [`PolicyChangeError`].
    pub async fn rollback_policy(
        &self,
        version: u64,
        actor: &crate::identity::SpiffeId,
        comment: &str,
    ) -> Result<PolicyChange, PolicyChangeError> {
        let old = self
            .store
            .policy_version(Some(version))
            .await
            .map_err(BrokerError::from)?
            .ok_or(PolicyChangeError::NoVersion(version))?;
        self.change_policy(&old.yaml, actor, "rollback", comment, Some(version))
            .await
    }

    async fn change_policy(
        &self,
        yaml: &str,
        actor: &crate::identity::SpiffeId,
        source: &str,
        comment: &str,
        to_version: Option<u64>,
    ) -> Result<PolicyChange, PolicyChangeError> {
        use crate::audit::{AuditEvent, AuditKind, Outcome};
        use crate::policy::diff::{MAX_AUDIT_DIFF, diff};
        if let super::PolicySource::File { name, .. } = &self.settings.policy_source {
            return Err(PolicyChangeError::FileMode(name.clone()));
        }
        let now = self.clock.now();
        let comment: String = crate::auth::answer::safe_description(comment)
            .chars()
            .take(200)
            .collect();
        let policy = crate::policy::Policy::parse(yaml)
            .map_err(|e| PolicyChangeError::Invalid(e.with_file("policy").to_string()))?;
        if policy.trust_domain != self.settings.trust_domain.trust_domain() {
            return Err(PolicyChangeError::Invalid(format!(
                "the policy is for trust domain {}, this broker for {}",
                policy.trust_domain,
                self.settings.trust_domain.trust_domain()
            )));
        }
        let current = self
            .store
            .policy_version(None)
            .await
            .map_err(BrokerError::from)?;
        let (old_text, old_name) = current
            .as_ref()
            .map_or((String::new(), "none".into()), |v| {
                (v.yaml.clone(), format!("v{}", v.version))
            });
        let change = diff(&old_text, yaml, &old_name, "new");
        if let Some(v) = &current
            && change.is_empty()
        {
            return Ok(PolicyChange {
                version: v.version,
                diff: change,
            });
        }
        let version = self
            .store
            .insert_policy_version(actor.as_str(), source, &comment, yaml, now)
            .await
            .map_err(BrokerError::from)?;
        let mut event = AuditEvent::new(AuditKind::PolicyChange, Outcome::Ok, now)
            .actor(actor)
            .field("how", source)
            .field("version", version)
            .field("previous", current.as_ref().map_or(0, |v| v.version))
            .field("added", change.added)
            .field("removed", change.removed)
            .field("diff", change.text_within(MAX_AUDIT_DIFF))
            .field("comment", comment.as_str());
        if let Some(to) = to_version {
            event = event.field("rolled_back_to", to);
        }
        self.audit(event).await;
        self.set_policy(policy).await?;
        tracing::info!(version, how = source, actor = %actor, "trust policy changed");
        Ok(PolicyChange {
            version,
            diff: change,
        })
    }
}

/// What [`Broker::review`] found, and over what.
#[derive(Debug)]
pub struct ReviewReport {
    /// The findings.
    pub review: crate::policy::review::Review,
    /// The window (Unix seconds).
    pub window: (u64, u64),
    /// The stored policy version reviewed (0: none stored).
    pub policy_version: u64,
    /// Tokens issued in the window.
    pub tokens: u64,
}

impl Broker {
    /// Access review over the last `unused_for` seconds against the policy
    /// served now.
    ///
    /// # Errors
    /// [`BrokerError::Store`].
    pub async fn review(
        &self,
        unused_for: u64,
        ttl_ceiling: u64,
    ) -> Result<ReviewReport, BrokerError> {
        use crate::policy::review::{Seen, Usage, review};
        let now = self.clock.now();
        let start = now.saturating_sub(unused_for);
        let rows = self.store.token_usage(start).await?;
        let tokens = rows.iter().map(|r| r.count).sum();
        let usage: Vec<Usage> = rows
            .into_iter()
            .map(|r| Usage {
                sub: r.sub,
                aud: r.aud,
                scopes: r.scope,
                class: r.class,
                count: r.count,
                longest_life: r.longest_life,
            })
            .collect();
        let seen: Vec<Seen> = self
            .store
            .identities(now)
            .await?
            .into_iter()
            .map(|i| Seen {
                last_seen: i.last_seen(),
                id: i.spiffe_id,
            })
            .collect();
        let policy = self.policy();
        let policy_version = self
            .store
            .policy_version(None)
            .await?
            .map_or(0, |v| v.version);
        Ok(ReviewReport {
            review: review(&policy, &usage, &seen, start, ttl_ceiling),
            window: (start, now),
            policy_version,
            tokens,
        })
    }
}
