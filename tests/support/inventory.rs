//! What both stores must do with JWT-SVIDs in the inventory (schema 11):
//! kept beside access tokens with their kind, several audiences and no
//! key binding, found by any one of their audiences, and rows written
//! before the kind column read as access tokens; and with WITs: no
//! audience, bound to a key, outside access review.

use tally::audit::{AuditEvent, AuditKind, Outcome};
use tally::store::{IssuedToken, Store, TokenFilter, Write};
use tally::token::TokenKind;

const NOW: u64 = 1_800_000_000;
const HOLDER: &str = "spiffe://example.org/ns/shop/sa/checkout";

/// A JWT-SVID's inventory record for two audiences.
pub fn jwt_svid(i: u64) -> IssuedToken {
    IssuedToken {
        jti: format!("{NOW:09x}{i:06x}svid"),
        kind: TokenKind::JwtSvid,
        sub: HOLDER.parse().unwrap(),
        aud: vec![
            "spiffe://example.org/ns/pay/sa/payments".parse().unwrap(),
            "https://api.example.org".parse().unwrap(),
        ],
        scope: tally::token::Scopes::default(),
        class: tally::token::TokenClass::Service,
        jkt: None,
        iat: NOW,
        exp: NOW + 120,
        kid: "k1".into(),
        token_hmac: [0xa0 | u8::try_from(i % 16).unwrap(); 32],
    }
}

/// A WIT's inventory record: no audience, no scopes, bound to a key.
pub fn wit(i: u64) -> IssuedToken {
    IssuedToken {
        jti: format!("{NOW:09x}{i:06x}wit"),
        kind: TokenKind::Wit,
        sub: HOLDER.parse().unwrap(),
        aud: Vec::new(),
        scope: tally::token::Scopes::default(),
        class: tally::token::TokenClass::Service,
        jkt: Some(
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
                .parse()
                .unwrap(),
        ),
        iat: NOW,
        exp: NOW + 3600,
        kid: "k1".into(),
        token_hmac: [0xb0 | u8::try_from(i % 16).unwrap(); 32],
    }
}

/// On a `store` holding no other WIT: a WIT is kept with its kind, no
/// audience and its key, found by kind and not by any audience, left out
/// of access review, and covered by a revocation's lifetime by holder and
/// by key.
pub async fn wits_sit_beside_other_tokens(store: &Store) {
    let t = wit(1);
    let usage_before = store.token_usage(NOW - 10).await.unwrap();
    record(store, t.clone()).await;
    assert_eq!(
        store.token_by_jti(&t.jti, &t.token_hmac).await.unwrap(),
        Some(t.clone())
    );
    let find = |aud: Option<&str>, kind: Option<TokenKind>| {
        let filter = TokenFilter {
            now: NOW,
            aud: aud.map(str::to_owned),
            kind,
            ..TokenFilter::default()
        };
        async move { store.find_live_tokens(&filter, 10).await.unwrap() }
    };
    assert_eq!(find(None, Some(TokenKind::Wit)).await, vec![t.clone()]);
    assert!(
        find(Some("https://api.example.org"), Some(TokenKind::Wit))
            .await
            .is_empty()
    );
    assert!(find(None, None).await.contains(&t));
    assert_eq!(
        store.token_usage(NOW - 10).await.unwrap(),
        usage_before,
        "a WIT is granted by no issue rule"
    );
    let jkt = t.jkt.unwrap().to_string();
    for (sub, jkt) in [(Some(HOLDER), None), (None, Some(jkt.as_str()))] {
        assert_eq!(
            store.latest_live_exp(NOW, NOW, sub, jkt).await.unwrap(),
            Some(t.exp),
            "{sub:?} {jkt:?}"
        );
    }
    assert!(
        store
            .live_exp_by_kid(NOW)
            .await
            .unwrap()
            .contains(&("k1".to_owned(), t.exp)),
        "the signing key stays published while the WIT lives"
    );
}

async fn record(store: &Store, token: IssuedToken) {
    let kind = match token.kind {
        TokenKind::Wit => AuditKind::WitIssue,
        _ => AuditKind::JwtSvidIssue,
    };
    let event = AuditEvent::new(kind, Outcome::Ok, token.iat)
        .actor(&token.sub)
        .field("jti", token.jti.as_str());
    store
        .record(Some(Write::Issued(token)), event)
        .await
        .unwrap();
}

/// On an empty `store`: a JWT-SVID is kept with its kind and audiences,
/// found by either audience and by kind, counted once per audience in
/// access review, and covered by a revocation's lifetime.
pub async fn jwt_svids_sit_beside_access_tokens(store: &Store) {
    let t = jwt_svid(1);
    record(store, t.clone()).await;
    assert_eq!(
        store.token_by_jti(&t.jti, &t.token_hmac).await.unwrap(),
        Some(t.clone())
    );
    assert_eq!(store.token_exp(&t.jti).await.unwrap(), Some(t.exp));
    let find = |aud: Option<&str>, kind: Option<TokenKind>| {
        let filter = TokenFilter {
            now: NOW,
            aud: aud.map(str::to_owned),
            kind,
            ..TokenFilter::default()
        };
        async move { store.find_live_tokens(&filter, 10).await.unwrap() }
    };
    for aud in [
        "spiffe://example.org/ns/pay/sa/payments",
        "https://api.example.org",
    ] {
        assert_eq!(find(Some(aud), None).await, vec![t.clone()], "{aud}");
    }
    // Neither a part of an audience nor a LIKE pattern matches.
    for aud in [
        "https://api",
        "%",
        "spiffe://example.org/ns/pay/sa/payments https",
    ] {
        assert!(find(Some(aud), None).await.is_empty(), "{aud}");
    }
    assert_eq!(find(None, Some(TokenKind::JwtSvid)).await, vec![t.clone()]);
    assert!(find(None, Some(TokenKind::Access)).await.is_empty());
    let usage = store.token_usage(NOW - 10).await.unwrap();
    let mut auds: Vec<String> = usage.iter().map(|u| u.aud.to_string()).collect();
    auds.sort();
    assert_eq!(
        auds,
        [
            "https://api.example.org",
            "spiffe://example.org/ns/pay/sa/payments"
        ]
    );
    assert_eq!(
        store
            .latest_live_exp(NOW, NOW, Some(HOLDER), None)
            .await
            .unwrap(),
        Some(t.exp)
    );
}

/// SQL that takes a schema-11 store back to 10 with one old access-token
/// row (jti `old`, a zero hash), in SQLite's or PostgreSQL's words.
pub fn before_kinds(postgres: bool) -> [String; 3] {
    let zeros = if postgres {
        "decode(repeat('00', 32), 'hex')".to_owned()
    } else {
        format!("X'{}'", "00".repeat(32))
    };
    [
        "ALTER TABLE issued_tokens DROP COLUMN kind".into(),
        "DELETE FROM schema_version WHERE version >= 11".into(),
        format!(
            "INSERT INTO issued_tokens (jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac) \
             VALUES ('old', '{HOLDER}', 'spiffe://example.org/ns/pay/sa/payments', \
             'payments:read', 'service', '0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I', \
             1800000000, 1800000300, 'k1', {zeros})"
        ),
    ]
}

/// On a store taken back by [`before_kinds`] and opened again (which
/// migrated it): the old row reads as the access token it was.
pub async fn old_tokens_read_as_access_tokens(store: &Store) {
    assert_eq!(store.schema_version().await.unwrap(), 11);
    let old = store.token_by_jti("old", &[0; 32]).await.unwrap().unwrap();
    assert_eq!(old.kind, TokenKind::Access);
    assert_eq!(old.aud.len(), 1);
    assert!(old.jkt.is_some());
}
