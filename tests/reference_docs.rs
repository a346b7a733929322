//! The reference pages under `docs/` that are made from the code, checked
//! against it: a flag, setting, error, audit kind or metric added without
//! its line in the page fails here (`TALLY_BLESS=1` rewrites the pages;
//! see docs/TESTING.md).

mod support;

use clap::{Args as _, Command};
use std::collections::BTreeSet;
use support::process::{PATIENCE, output_within};
use support::reference::{cell, check_page, doc_path};
use tally::config::{DefaultValue, Defaults};

/// One command's settings, as its parser defines them.
struct Settings {
    name: &'static str,
    command: Command,
    keys: &'static [&'static str],
    flag_only: &'static [&'static str],
    defaults: &'static Defaults,
}

fn broker() -> Settings {
    Settings {
        name: "broker",
        command: tally::broker::config::BrokerFlags::augment_args(Command::new("broker")),
        keys: tally::broker::config::KEYS,
        flag_only: tally::broker::config::FLAG_ONLY,
        defaults: &tally::broker::config::DEFAULTS,
    }
}

fn sidecar() -> Settings {
    Settings {
        name: "sidecar",
        command: tally::sidecar::config::SidecarFlags::augment_args(Command::new("sidecar")),
        keys: tally::sidecar::config::KEYS,
        flag_only: tally::sidecar::config::FLAG_ONLY,
        defaults: &tally::sidecar::config::DEFAULTS,
    }
}

fn injector() -> Settings {
    Settings {
        name: "injector",
        command: tally::injector::config::InjectorFlags::augment_args(Command::new("injector")),
        keys: tally::injector::config::KEYS,
        flag_only: tally::injector::config::FLAG_ONLY,
        defaults: &tally::injector::config::DEFAULTS,
    }
}

impl Settings {
    /// The arguments with a long flag (clap's own --help has none here).
    fn args(&self) -> impl Iterator<Item = &clap::Arg> {
        self.command
            .get_arguments()
            .filter(|a| a.get_long().is_some())
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| flag | variable | YAML key | default | meaning |\n|---|---|---|---|---|\n",
        );
        for arg in self.args() {
            let id = arg.get_id().as_str();
            let long = arg.get_long().unwrap();
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            let many = arg.get_value_delimiter().is_some();
            let flag = if switch {
                format!("`--{long}`")
            } else {
                let value = arg.get_value_names().unwrap()[0].to_string();
                format!("`--{long} {value}`")
            };
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_else(|| "—".into());
            let key = if self.keys.contains(&id) {
                format!("`{id}`")
            } else {
                "— (flag only)".into()
            };
            let default = match self.defaults.get(id) {
                Some(DefaultValue::Text(t)) => format!("`{t}`"),
                Some(DefaultValue::Derived(t)) => cell(t),
                None if switch => "off".into(),
                None => "—".into(),
            };
            let help = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
            let mut help = match self.defaults.get(id) {
                Some(d) => help
                    .replace(&format!("\n\n[default: {}]", d.shown()), "")
                    .replace(&format!(" [default: {}]", d.shown()), ""),
                None => help,
            };
            if many {
                help.push_str(" (Repeatable; the variable takes a comma-separated list, the YAML key a list.)");
            }
            if switch {
                help.push_str(" (A switch; YAML `true`/`false`.)");
            }
            out.push_str(&format!(
                "| {flag} | {env} | {key} | {default} | {} |\n",
                cell(&help)
            ));
        }
        out
    }
}

#[test]
fn every_flag_has_a_yaml_key_and_every_key_a_flag() {
    for s in [broker(), sidecar(), injector()] {
        let ids: BTreeSet<&str> = s.args().map(|a| a.get_id().as_str()).collect();
        for id in &ids {
            assert!(
                s.keys.contains(id) || s.flag_only.contains(id),
                "{}: --{id} has no YAML key and is not flag-only",
                s.name
            );
        }
        for key in s.keys {
            assert!(ids.contains(key), "{}: YAML key {key} has no flag", s.name);
        }
        for (key, _) in s.defaults.0 {
            assert!(
                ids.contains(key),
                "{}: default for {key}, no such flag",
                s.name
            );
        }
        for arg in s.args() {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!("TALLY_{}", arg.get_id().as_str().to_uppercase());
            assert_eq!(
                env.as_deref(),
                Some(expected.as_str()),
                "{}: --{}",
                s.name,
                arg.get_id()
            );
        }
    }
}

#[test]
fn help_shows_every_default_resolve_uses() {
    for s in [broker(), sidecar(), injector()] {
        let o = output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args([s.name, "--help"]),
            PATIENCE,
        );
        let help = String::from_utf8(o.stdout).unwrap();
        for (key, default) in s.defaults.0 {
            let flag = s
                .args()
                .find(|a| a.get_id() == key)
                .unwrap()
                .get_long()
                .unwrap();
            // The flag's entry runs from its name to the next flag.
            let at = help
                .find(&format!("--{flag} "))
                .unwrap_or_else(|| panic!("--{flag}"));
            let entry = &help[at..];
            let entry = &entry[..entry[2..].find("\n      --").map_or(entry.len(), |n| n + 2)];
            assert!(
                entry.contains(&format!("[default: {}]", default.shown())),
                "tally {} --help: --{flag} does not show its default:\n{entry}",
                s.name
            );
        }
    }
}

#[test]
fn the_configuration_reference_is_the_parsers() {
    check_page(
        "CONFIGURATION.md",
        &[
            ("broker", broker().table()),
            ("sidecar", sidecar().table()),
            ("injector", injector().table()),
        ],
    );
}

/// Every `TALLY_*` name in the source.
fn variables_in_source() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("TALLY_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                // `TALLY_*` in prose is not a name.
                if name.len() > "TALLY_".len() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn every_variable_the_code_reads_is_in_the_reference() {
    let page = std::fs::read_to_string(doc_path("CONFIGURATION.md")).unwrap();
    let variables = variables_in_source();
    assert!(variables.contains("TALLY_STORE_KEY"), "{variables:?}");
    for name in variables {
        assert!(
            page.contains(&format!("`{name}`")),
            "docs/CONFIGURATION.md lacks `{name}`"
        );
    }
}

fn error_table() -> String {
    use tally::auth::cases::Case;
    let mut out = String::from(
        "| when | status | `error` | `WWW-Authenticate` | also sent | example `error_description` |\n|---|---|---|---|---|---|\n",
    );
    for case in Case::ALL {
        let refusal = case.example();
        let a = tally::auth::refusal_answer(&refusal, Some("NONCE".into()));
        let challenge = a
            .www_authenticate
            .as_deref()
            .map(|h| format!("`{}`", h.replace(&a.description, "…")))
            .unwrap_or_else(|| "—".into());
        let mut also = Vec::new();
        if a.dpop_nonce.is_some() {
            also.push("`DPoP-Nonce` (a fresh nonce)".to_owned());
        }
        if let Some(secs) = a.retry_after {
            also.push(if case == Case::RateLimited {
                "`Retry-After` (seconds until the caller's rate allows one more)".to_owned()
            } else {
                format!("`Retry-After: {secs}`")
            });
        }
        let also = if also.is_empty() {
            "—".into()
        } else {
            also.join(" ")
        };
        out.push_str(&format!(
            "| {} | {} | `{}` | {} | {} | {} |\n",
            cell(case.when()),
            a.status,
            a.error,
            challenge.replace('|', "\\|"),
            cell(&also),
            cell(&a.description),
        ));
    }
    out
}

#[test]
fn the_error_reference_is_the_one_answer_mapping() {
    check_page("ERRORS.md", &[("refusals", error_table())]);
}

/// Every string literal in `src/` that starts with `prefix`, up to its
/// closing quote.
fn literals_in_source(prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    let needle = format!("\"{prefix}");
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut rest = text.as_str();
            while let Some(at) = rest.find(&needle) {
                let body = &rest[at + 1..];
                let end = body.find('"').unwrap_or(body.len());
                found.insert(body[..end].to_owned());
                rest = &body[end..];
            }
        }
    }
    found
}

#[test]
fn every_metric_name_in_the_source_is_in_the_reference() {
    let page = std::fs::read_to_string(doc_path("METRICS.md")).unwrap();
    let names: BTreeSet<String> = [
        "tally_broker_",
        "tally_sidecar_",
        "tally_listener_",
        "tally_injector_",
    ]
    .iter()
    .flat_map(|p| literals_in_source(p))
    .collect();
    assert!(names.len() >= 30, "{names:?}");
    for name in names {
        assert!(
            page.contains(&format!("| `{name}` |")),
            "docs/METRICS.md lacks {name}"
        );
    }
}

#[test]
fn the_audit_reference_lists_every_kind() {
    use tally::audit::AuditKind;
    let mut out = String::from("| `kind` | what happened |\n|---|---|\n");
    let mut seen = BTreeSet::new();
    for kind in AuditKind::ALL {
        assert!(seen.insert(kind.as_str()), "{kind:?} twice");
        out.push_str(&format!(
            "| `{}` | {} |\n",
            kind.as_str(),
            cell(kind.meaning())
        ));
    }
    check_page("AUDIT.md", &[("kinds", out)]);
}

#[test]
fn the_policy_reference_names_every_key_the_parser_accepts() {
    let page = std::fs::read_to_string(doc_path("POLICY.md")).unwrap();
    for (place, keys) in tally::policy::POLICY_KEYS {
        for key in keys {
            assert!(
                page.contains(&format!("| `{key}` |")),
                "docs/POLICY.md lacks the {place} key `{key}`"
            );
        }
    }
    // The example at the top parses.
    let example = page
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    tally::policy::Policy::parse(example).unwrap();
}
