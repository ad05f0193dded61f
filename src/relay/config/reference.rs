//! The configuration reference: every key with its type, default, environment variable, flag and meaning,
//! read from the JSON Schema that `schemars` derives from the structs the parser deserializes into (their doc
//! comments, types and `Default` values), so it cannot say anything the parser does not do.
//! `qx-relay config --reference` prints it; docs/configuration.md is that output, and tests/reference.rs fails
//! when the two differ.

use std::borrow::Cow;
use std::fmt::Write as _;

use clap::{Args, CommandFactory};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::env::{env_variable_for, ENV_LOG_FILTER};
use super::{CacheConfig, Config, DbConfig, NatsConfig, Overrides, RelayConfig};
use crate::relay::cli::Cli;

/// The schema of a `humantime_serde` duration: written as `"250ms"`, `"5m"`, `"7d"`.
pub(super) struct Humantime;

impl JsonSchema for Humantime {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "duration" })
    }
}

/// The schema of a listening address: `host:port`, or `:port` for every interface.
pub(super) struct ListenAddr;

impl JsonSchema for ListenAddr {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "ListenAddr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "address" })
    }
}

/// One setting, as the reference describes it.
#[derive(Debug, Clone)]
pub struct Key {
    /// `nats`, `db`, `cache` or `relay`: the TOML table.
    pub section: String,
    /// The key within its table.
    pub name: String,
    /// Its type, as a person writes it (`duration`, `integer`, `"mark" or "delete"`).
    pub kind: String,
    /// The default as JSON; `None` when unset by default.
    pub default: Option<Value>,
    /// The environment variable that sets it, if the relay reads one.
    pub env: Option<String>,
    /// The flag that overrides it, if any.
    pub flag: Option<String>,
    /// What it means: the field's doc comment, then its values' when it takes a fixed set.
    pub description: String,
}

impl Key {
    /// `section.name`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// The default as TOML would write it (`"250ms"`, `1000`, `["nats://localhost:4222"]`), or `None`.
    pub fn default_toml(&self) -> Option<String> {
        let value = toml::Value::try_from(self.default.as_ref()?).ok()?;
        Some(value.to_string())
    }
}

/// A table of the settings file, in the order the struct declares it.
#[derive(Debug, Clone)]
pub struct Section {
    /// The table's name.
    pub name: String,
    /// The doc comment of `Config`'s field.
    pub description: String,
    /// Its keys, in declaration order.
    pub keys: Vec<Key>,
}

/// Every section and key, from the schema of [`Config`].
pub fn sections() -> Vec<Section> {
    let schema = serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is JSON");
    let defs = &schema["$defs"];
    let flags = flags();
    // serde_json's map sorts the schema's properties; serde's own field lists give the declared order.
    let tables = [
        ("nats", fields::<NatsConfig>()),
        ("db", fields::<DbConfig>()),
        ("cache", fields::<CacheConfig>()),
        ("relay", fields::<RelayConfig>()),
    ];
    debug_assert_eq!(tables.iter().map(|(name, _)| *name).collect::<Vec<_>>(), fields::<Config>());
    tables
        .into_iter()
        .map(|(section, order)| {
            let property = &schema["properties"][section];
            let table = resolve(property, defs);
            let keys = order
                .iter()
                .map(|&name| {
                    let field = &table["properties"][name];
                    let default = field.get("default").filter(|value| !value.is_null()).cloned();
                    Key {
                        section: section.to_owned(),
                        name: name.to_owned(),
                        kind: kind(field, defs),
                        default,
                        env: env_variable_for(section, name),
                        flag: (section == "relay")
                            .then(|| flags.iter().find(|(key, _)| key == name))
                            .flatten()
                            .map(|(_, flag)| flag.clone()),
                        description: description(field, defs),
                    }
                })
                .collect();
            Section { name: section.to_owned(), description: text(property), keys }
        })
        .collect()
}

/// The reference as Markdown: docs/configuration.md.
pub fn markdown() -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# Configuration reference");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Generated by `qx-relay config --reference` from the definitions the relay parses its settings with \
         (`src/relay/config/mod.rs`: doc comments, types, defaults); `tests/reference.rs` fails when this file \
         differs from what the code generates. Regenerate it with \
         `cargo run --quiet -- config --reference > docs/configuration.md`."
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Every setting has a default; `relay.subject_prefix` alone must be set. Precedence, lowest first: the \
         defaults, the TOML file (`--config` or `QX_RELAY_CONFIG`; `config/qx-relay.toml` lists every key), \
         the environment, the flags. Under `QX_NATS__`, `QX_DB__` and `QX_CACHE__` only the variables named \
         here are read (a sidecar shares its service's environment); an unknown key in the file or under \
         `QX_RELAY__` stops the relay with exit 78. Durations are humantime: `\"250ms\"`, `\"2s\"`, `\"5m\"`, \
         `\"7d\"`; each wait and timeout is at most 1 day. `qx-relay config` prints the merged result, secrets \
         redacted, and `qx-relay check` also connects."
    );
    for section in sections() {
        let _ = writeln!(w);
        let _ = writeln!(w, "## `[{}]`", section.name);
        let _ = writeln!(w);
        let _ = writeln!(w, "{}", section.description);
        let _ = writeln!(w);
        let _ = writeln!(w, "| key | type | default | environment | flag |");
        let _ = writeln!(w, "| --- | --- | --- | --- | --- |");
        for key in &section.keys {
            let _ = writeln!(
                w,
                "| [`{}`](#{}) | {} | {} | {} | {} |",
                key.name,
                anchor(&key.path()),
                key.kind.replace('|', "\\|"),
                key.default_toml().map_or("unset".to_owned(), |value| code(&value)),
                key.env.as_deref().map_or("-".to_owned(), code),
                key.flag.as_deref().map_or("-".to_owned(), code),
            );
        }
        for key in &section.keys {
            let _ = writeln!(w);
            let _ = writeln!(w, "### `{}`", key.path());
            let _ = writeln!(w);
            let _ = writeln!(w, "{}", key.description);
            let _ = writeln!(w);
            let _ = writeln!(w, "- type: {}", key.kind);
            let default = key.default_toml().map_or("unset".to_owned(), |value| code(&value));
            let _ = writeln!(w, "- default: {default}");
            if let Some(env) = &key.env {
                let _ = writeln!(w, "- environment: `{env}`");
            }
            if let Some(flag) = &key.flag {
                let _ = writeln!(w, "- flag: `{flag}`");
            }
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "## The process");
    let _ = writeln!(w);
    let _ = writeln!(w, "Not settings of the relay: read before the settings are.");
    let _ = writeln!(w);
    let _ = writeln!(w, "| environment | flag | meaning |");
    let _ = writeln!(w, "| --- | --- | --- |");
    let cli = Cli::command();
    for arg in cli.get_arguments().filter(|arg| arg.get_env().is_some()) {
        let env = arg.get_env().and_then(|env| env.to_str()).unwrap_or_default();
        let mut help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let defaults: Vec<_> = arg.get_default_values().iter().filter_map(|value| value.to_str()).collect();
        if !defaults.is_empty() {
            let _ = write!(help, " (default `{}`)", defaults.join(","));
        }
        let flag = arg.get_long().map_or("-".to_owned(), |long| format!("`--{long}`"));
        let _ = writeln!(w, "| `{env}` | {flag} | {help} |");
    }
    let _ = writeln!(
        w,
        "| `{ENV_LOG_FILTER}` | - | Log filter in tracing's `EnvFilter` syntax (`info`, `qx_relay=debug`); else \
         `RUST_LOG`, else `info`. |"
    );
    out
}

/// `relay.<key>` → `--<flag>` for the settings the command line overrides (`Overrides`, merged as `[relay]`).
fn flags() -> Vec<(String, String)> {
    Overrides::augment_args(clap::Command::new("qx-relay"))
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .map(|long| (long.replace('-', "_"), format!("--{long}")))
        .collect()
}

fn code(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|"))
}

/// GitHub's anchor for a heading of `` `path` ``.
fn anchor(path: &str) -> String {
    path.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect()
}

fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str).and_then(|path| path.strip_prefix("#/$defs/")) {
        Some(name) => &defs[name],
        None => schema,
    }
}

fn text(schema: &Value) -> String {
    schema.get("description").and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// The field's doc comment; for a fixed set of values, each value's own after it.
fn description(field: &Value, defs: &Value) -> String {
    let mut out = text(field);
    let target = resolve(field, defs);
    if out.is_empty() {
        out = text(target);
    }
    let variants = target.get("oneOf").and_then(Value::as_array).into_iter().flatten();
    for variant in variants {
        if let (Some(value), Some(meaning)) = (variant.get("const"), variant.get("description")) {
            let _ = write!(out, "\n- `{value}`: {}", meaning.as_str().unwrap_or_default());
        }
    }
    out
}

/// The type as a person writes it.
fn kind(schema: &Value, defs: &Value) -> String {
    let schema = resolve(schema, defs);
    if let Some(value) = schema.get("const") {
        return value.to_string();
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values.iter().map(Value::to_string).collect::<Vec<_>>().join(" or ");
    }
    for alternatives in ["oneOf", "anyOf"] {
        if let Some(items) = schema.get(alternatives).and_then(Value::as_array) {
            let kinds: Vec<String> =
                items.iter().map(|item| kind(item, defs)).filter(|kind| kind != "null").collect();
            return kinds.join(" or ");
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    let format = schema.get("format").and_then(Value::as_str);
    match (types.as_slice(), format) {
        (["string"], Some(format)) => format.to_owned(),
        (["string"], None) => "string".to_owned(),
        (["integer"], _) => "integer".to_owned(),
        (["number"], _) => "number".to_owned(),
        (["boolean"], _) => "boolean".to_owned(),
        (["array"], _) => format!("list of {}s", kind(&schema["items"], defs)),
        (["null"] | [], _) => "null".to_owned(),
        (other, _) => other.join(" or "),
    }
}

/// The fields of `T` in the order it declares them: the list serde's derive hands to `deserialize_struct`.
fn fields<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
    let mut seen = None;
    let _ = T::deserialize(FieldProbe(&mut seen));
    seen.unwrap_or_default().to_vec()
}

/// A deserializer that records the struct's field list and then fails.
struct FieldProbe<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_meaning_a_type_and_a_variable() {
        for section in sections() {
            assert!(!section.description.is_empty(), "{}", section.name);
            for key in section.keys {
                assert!(!key.description.is_empty(), "{} has no doc comment", key.path());
                assert!(!key.kind.is_empty() && key.kind != "null", "{}: {}", key.path(), key.kind);
                assert!(key.env.is_some(), "{} is read from no variable", key.path());
            }
        }
    }

    #[test]
    fn types_defaults_and_flags_read_as_written() {
        let keys: Vec<Key> = sections().into_iter().flat_map(|section| section.keys).collect();
        let key = |path: &str| keys.iter().find(|key| key.path() == path).unwrap_or_else(|| panic!("{path}"));
        let poll = key("relay.poll_interval");
        assert_eq!((poll.kind.as_str(), poll.default_toml().as_deref()), ("duration", Some("\"250ms\"")));
        assert_eq!(key("relay.leader").kind, r#""none" or "redis" or "postgres""#);
        assert_eq!(key("relay.leader").flag.as_deref(), Some("--leader"));
        assert_eq!(key("relay.shard_id").kind, r#"integer or "auto""#);
        assert_eq!(key("relay.shard_id").default_toml().as_deref(), Some("0"));
        assert_eq!(key("relay.statement_timeout").default, None);
        assert_eq!(key("nats.servers").kind, "list of strings");
        assert_eq!(key("nats.servers").env.as_deref(), Some("QX_NATS__SERVERS"));
        assert_eq!(key("db.url").env.as_deref(), Some("QX_DB__URL"));
        assert_eq!(key("relay.metrics_addr").kind, "address");
        assert_eq!(keys.first().map(Key::path).as_deref(), Some("nats.servers"), "declaration order");
    }
}
