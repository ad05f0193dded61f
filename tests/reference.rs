//! What is generated from the code stays what the repository ships: docs/configuration.md is the output of
//! `qx-relay config --reference`, config/qx-relay.toml lists every key with the default the code has, and
//! the binary prints its completions and man pages without any settings. No services needed.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use qx_relay::relay::config::reference::{self, Key};
use qx_relay::relay::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_qx-relay");

fn repo_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Runs the binary with an empty environment, so no setting can come from this shell.
fn qx_relay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_clear().output().expect("run qx-relay");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn docs_configuration_md_is_what_the_code_generates() {
    let generated = reference::markdown();
    let checked_in = repo_file("docs/configuration.md");
    if checked_in != generated {
        let line = checked_in.lines().zip(generated.lines()).position(|(a, b)| a != b);
        panic!(
            "docs/configuration.md differs from what the code generates (first at line {}); regenerate it: \
             cargo run --quiet -- config --reference > docs/configuration.md",
            line.map_or_else(|| "the end".to_owned(), |n| (n + 1).to_string())
        );
    }
    let (code, stdout, stderr) = qx_relay(&["config", "--reference"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, generated, "the subcommand prints the same reference, with no settings at all");
}

/// A `key = value` line of the settings file, commented out or not.
struct Line {
    number: usize,
    section: String,
    key: String,
    value: String,
    commented: bool,
}

/// The key lines of a settings file that shows every key with its default, mostly commented out. A comment is a
/// key line when its text parses as a TOML `key = value` on its own; other comments are prose.
fn key_lines(text: &str) -> Vec<Line> {
    let mut section = String::new();
    let mut lines = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (body, commented) = match trimmed.strip_prefix('#') {
            Some(rest) => (rest.trim(), true),
            None => (trimmed, false),
        };
        let Ok(table) = body.parse::<toml::Table>() else {
            assert!(commented, "line {}: not TOML: {raw}", index + 1);
            continue;
        };
        let mut entries = table.into_iter();
        let (Some((key, value)), None) = (entries.next(), entries.next()) else { continue };
        if value.is_table() {
            continue; // `a.b = 1` style prose is not how this file writes keys
        }
        lines.push(Line {
            number: index + 1,
            section: section.clone(),
            key,
            value: value.to_string(),
            commented,
        });
    }
    lines
}

#[test]
fn config_qx_relay_toml_has_every_key_with_the_codes_default() {
    let text = repo_file("config/qx-relay.toml");
    let keys: Vec<Key> = reference::sections().into_iter().flat_map(|section| section.keys).collect();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for line in key_lines(&text) {
        let path = format!("{}.{}", line.section, line.key);
        let at = format!("config/qx-relay.toml:{}: {path}", line.number);
        let Some(key) = keys.iter().find(|key| key.path() == path) else {
            errors.push(format!("{at}: not a setting of the relay"));
            continue;
        };
        if !seen.insert(path.clone()) {
            errors.push(format!("{at}: listed twice"));
        }
        // Through the parser's own types: the value must load, and mean what the code's default means.
        let loaded =
            match toml::from_str::<Config>(&format!("[{}]\n{} = {}\n", line.section, line.key, line.value)) {
                Ok(config) => serde_json::to_value(config).expect("config is JSON"),
                Err(err) => {
                    errors.push(format!("{at}: does not load: {}", err.message()));
                    continue;
                }
            };
        match &key.default {
            Some(default) if &loaded[&line.section][&line.key] != default => errors.push(format!(
                "{at}: shows {} but the default is {}",
                line.value,
                key.default_toml().unwrap_or_default()
            )),
            None if !line.commented => {
                errors.push(format!("{at}: unset by default, so only a commented example belongs here"))
            }
            _ => {}
        }
    }
    for key in &keys {
        if !seen.contains(&key.path()) {
            errors.push(format!("config/qx-relay.toml: {} is missing (commented or not)", key.path()));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_settings_file_check_catches_what_it_should() {
    let lines = key_lines(
        "[relay]\n# Prose: leader = \"redis\"): not a key.\n# batch_size = 1000\nleader = \"none\"\n",
    );
    let found: Vec<(&str, bool)> = lines.iter().map(|line| (line.key.as_str(), line.commented)).collect();
    assert_eq!(found, [("batch_size", true), ("leader", false)]);
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, stdout, stderr) = qx_relay(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        for word in ["requeue", "shard-count", "metrics-addr"] {
            assert!(stdout.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, page, stderr) = qx_relay(&["man"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH qx-relay 1"), "{page}");
    assert!(page.contains("Exit codes") && page.contains("dead"), "{page}");
    assert!(!page.contains("completions"), "the packaging subcommands stay out of the page");

    let dir = std::env::temp_dir().join(format!("qx-relay-man-{}", std::process::id()));
    let (code, _, stderr) = qx_relay(&["man", "--out-dir", dir.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{stderr}");
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .expect("man pages written")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    std::fs::remove_dir_all(&dir).ok();
    for expected in ["qx-relay.1", "qx-relay-run.1", "qx-relay-dead.1", "qx-relay-dead-requeue.1"] {
        assert!(pages.iter().any(|page| page == expected), "{expected} not in {pages:?}");
    }
    assert!(!pages.iter().any(|page| page.contains("completions") || page.contains("-man")), "{pages:?}");
}
