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
    /// The first chained record.
    pub chain_from: u64,
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
        let mut verifier = ChainVerifier::new(head.chain_from);
        let mut after = head.chain_from.saturating_sub(1);
        let problem = 'check: loop {
            let page = self.store.audit_after(after, VERIFY_PAGE).await?;
            let done = page.len() < VERIFY_PAGE as usize;
            for record in page.iter().take_while(|r| r.seq <= head.seq) {
                if let Err(e) = verifier.push_record(record) {
                    break 'check Some(e);
                }
                after = record.seq;
            }
            if done || after >= head.seq {
                // Records past the head belong to writes after it was read.
                break verifier.finish(head.seq, &head.hash).err();
            }
        };
        Ok(AuditVerification {
            checked: verifier.checked(),
            chain_from: head.chain_from,
            head,
            problem,
        })
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
        let Some((token, revoked)) = self.find_token(token).await? else {
            return Ok(None);
        };
        let filter = AuditFilter {
            jti: Some(token.jti.clone()),
            ..AuditFilter::default()
        };
        let records = self.store.audit_query(&filter, LOOKUP_RECORDS).await?;
        Ok(Some(TokenLookup {
            token,
            revoked,
            records,
        }))
    }
}
