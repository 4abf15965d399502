//! Every configuration key the documents name exists (issue 16): a key spelled `section.key`
//! in backticks, or as its `EDGECHAT_SECTION__KEY` variable, in README.md, systemd/README.md,
//! ARCHITECTURE.md, config.toml or the unit file, is one `edgechat` reads. An operator who
//! copies one from the docs must not get a key that silently does nothing, or a refusal.

use edgechat::config::{Config, LocalModelConfig};
use edgechat::secret::Secret;
use std::collections::BTreeSet;
use std::path::Path;
use toml::Value;

/// Every dotted key of the configuration, sections included.
fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
        if let Value::Table(t) = value {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(key.clone());
                walk(&key, v, out);
            }
        }
    }
    let mut config = Config::default();
    // Keys left out of a default file because they have no value.
    config.auth.jwt_secret = Some(Secret::new("s"));
    config.auth.jwt_secret_file = Some("f".into());
    config.tls.cert_file = Some("c".into());
    config.tls.key_file = Some("k".into());
    config.metrics.token = Some(Secret::new("t"));
    config.storage.data_dir = Some("d".into());
    config.storage.url = Some(Secret::new("postgres://u"));
    config.storage.ca_file = Some("c".into());
    config.local.models = vec![LocalModelConfig {
        threads: Some(0),
        max_batch: Some(1),
        max_queue: Some(1),
        context: Some(1),
        prompt_cache_mb: Some(1),
        chat_template: Some("t".into()),
        ..LocalModelConfig::new("m.gguf", "m")
    }];
    let value = Value::try_from(&config).unwrap();
    let mut keys = BTreeSet::new();
    walk("", &value, &mut keys);
    // An entry of `[[local.models]]` is written `local.models.<key>` in prose.
    for key in keys.clone().iter().filter_map(|k| k.strip_prefix("local.models.0.")) {
        keys.insert(format!("local.models.{key}"));
    }
    keys
}

/// The keys `text` names: `a.b` spans in backticks whose first part is a section, and
/// `EDGECHAT_A__B` variables.
fn named_keys(text: &str, sections: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for span in text.split('`').skip(1).step_by(2) {
        let key = span.split([' ', '=']).next().unwrap_or("");
        let dotted =
            key.contains('.') && key.chars().all(|c| c.is_ascii_lowercase() || "_.".contains(c));
        let file = key.ends_with(".rs") || key.ends_with('.');
        if dotted && sections.contains(key.split('.').next().unwrap()) && !file {
            out.push(key.to_owned());
        }
    }
    for (at, _) in text.match_indices("EDGECHAT_") {
        let name: String = text[at + 9..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `EDGECHAT_SECTION__KEY` is how the docs write the rule itself.
        if name.contains("__") && name != "SECTION__KEY" {
            out.push(name.to_lowercase().replace("__", "."));
        }
    }
    out
}

#[test]
fn every_configuration_key_the_documents_name_exists() {
    let keys = known_keys();
    let sections: BTreeSet<String> = keys.iter().filter(|k| !k.contains('.')).cloned().collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut unknown = Vec::new();
    let mut named = 0;
    for doc in [
        "README.md",
        "systemd/README.md",
        "ARCHITECTURE.md",
        "config.toml",
        "systemd/edgechat.service",
    ] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for key in named_keys(&text, &sections) {
            named += 1;
            if !keys.contains(&key) {
                unknown.push(format!("{doc}: {key}"));
            }
        }
    }
    assert!(named > 30, "the scan found only {named} keys: is it still reading the docs?");
    assert!(
        unknown.is_empty(),
        "keys the documents name that edgechat does not read:\n{}",
        unknown.join("\n")
    );
}
