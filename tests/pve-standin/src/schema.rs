//! Request validation against the official PVE API schema (the subset in
//! schema/, a copy of shared/pve-api): unknown parameters, missing ones, types, ranges, enums, lengths,
//! patterns, named formats and property strings (`net0: virtio,bridge=vmbr1`).
//! Messages follow PVE::JSONSchema's wording.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

/// The schema of one PVE major version.
pub struct Schema {
    paths: Vec<(Vec<String>, String, Value)>,
}

/// Where the schema files live: $AGENTLAB_PVE_SCHEMA_DIR, else the copy in this
/// crate's `schema/` (see its README).
pub fn schema_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AGENTLAB_PVE_SCHEMA_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schema")
}

pub type Errors = BTreeMap<String, String>;

impl Schema {
    pub fn load(version: u8) -> Result<Schema, String> {
        let path = schema_dir().join(format!("pve{version}-schema-subset.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!("{}: {e} (set AGENTLAB_PVE_SCHEMA_DIR to a directory holding the schema files)", path.display())
        })?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{}: no paths", path.display()))?
            .iter()
            .map(|(template, methods)| {
                let segments = template.trim_start_matches('/').split('/').map(str::to_owned).collect();
                (segments, template.clone(), methods.clone())
            })
            .collect();
        Ok(Schema { paths })
    }

    /// The path template matching `path` (without /api2/json) and its path parameters.
    pub fn route(&self, path: &str) -> Option<(String, BTreeMap<String, String>)> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        'next: for (tmpl, template, _) in &self.paths {
            if tmpl.len() != segments.len() {
                continue;
            }
            let mut params = BTreeMap::new();
            for (t, s) in tmpl.iter().zip(&segments) {
                if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                    let decoded = percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
                    params.insert(name.to_owned(), decoded);
                } else if t != s {
                    continue 'next;
                }
            }
            return Some((template.clone(), params));
        }
        None
    }

    pub fn has_method(&self, template: &str, method: &str) -> bool {
        self.method(template, method).is_some()
    }

    fn method(&self, template: &str, method: &str) -> Option<&Value> {
        self.paths.iter().find(|(_, t, _)| t == template).and_then(|(_, _, m)| m.get(method))
    }

    /// Validates all parameters (path ones included) of a call.
    pub fn validate(&self, template: &str, method: &str, params: &BTreeMap<String, String>) -> Result<(), Errors> {
        let mut errors = Errors::new();
        let Some(def) = self.method(template, method) else {
            errors.insert("method".into(), format!("no {method} on {template}"));
            return Err(errors);
        };
        let empty = serde_json::Map::new();
        let props = def.pointer("/parameters/properties").and_then(Value::as_object).unwrap_or(&empty);
        for (name, value) in params {
            match lookup(props, name) {
                Some(prop) => {
                    if let Err(e) = check_value(prop, value) {
                        errors.insert(name.clone(), e);
                    }
                }
                None => {
                    errors.insert(
                        name.clone(),
                        "property is not defined in schema and the schema does not allow additional properties".into(),
                    );
                }
            }
        }
        for (name, prop) in props {
            if !is_true(prop.get("optional")) && !name.contains("[n]") && !params.contains_key(name) {
                errors.insert(name.clone(), "property is missing and it is not optional".into());
            }
            if let Some(req) = prop.get("requires").and_then(Value::as_str)
                && params.contains_key(name)
                && !params.contains_key(req)
            {
                errors.insert(req.to_owned(), format!("parameter is missing, but required by '{name}'"));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

fn is_true(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "1",
        _ => false,
    }
}

/// `net0` is described as `net[n]`.
fn lookup<'a>(props: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(p) = props.get(name) {
        return Some(p);
    }
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if base.len() < name.len() { props.get(&format!("{base}[n]")) } else { None }
}

fn number(v: Option<&Value>) -> Option<f64> {
    match v {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

/// Checks one value against its property definition.
pub fn check_value(prop: &Value, value: &str) -> Result<(), String> {
    let ty = prop.get("type").and_then(Value::as_str).unwrap_or("string");
    match ty {
        "integer" => {
            let n: i64 = value.trim().parse().map_err(|_| format!("type check ('integer') failed - got '{value}'"))?;
            check_range(prop, n as f64)?;
        }
        "number" => {
            let n: f64 = value.trim().parse().map_err(|_| format!("type check ('number') failed - got '{value}'"))?;
            check_range(prop, n)?;
        }
        "boolean" => {
            if !matches!(
                value.to_ascii_lowercase().as_str(),
                "0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off"
            ) {
                return Err(format!("type check ('boolean') failed - got '{value}'"));
            }
        }
        _ => {
            if let Some(max) = number(prop.get("maxLength"))
                && value.chars().count() as f64 > max
            {
                return Err(format!("value may only be {max} characters long"));
            }
            if let Some(min) = number(prop.get("minLength"))
                && (value.chars().count() as f64) < min
            {
                return Err(format!("value must be at least {min} characters long"));
            }
        }
    }
    if let Some(options) = prop.get("enum").and_then(Value::as_array) {
        let names: Vec<&str> = options.iter().filter_map(Value::as_str).collect();
        if !names.contains(&value) {
            return Err(format!("value '{value}' does not have a value in the enumeration '{}'", names.join(", ")));
        }
    }
    if let Some(pattern) = prop.get("pattern").and_then(Value::as_str) {
        let re =
            Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("schema pattern does not compile: {e}"))?;
        if !re.is_match(value) {
            return Err("value does not match the regex pattern".to_owned());
        }
    }
    match prop.get("format") {
        Some(Value::String(format)) => check_format(format, value),
        Some(Value::Object(fields)) => check_property_string(fields, value),
        _ => Ok(()),
    }
}

fn check_range(prop: &Value, n: f64) -> Result<(), String> {
    if let Some(min) = number(prop.get("minimum"))
        && n < min
    {
        return Err(format!("value must have a minimum value of {min}"));
    }
    if let Some(max) = number(prop.get("maximum"))
        && n > max
    {
        return Err(format!("value must have a maximum value of {max}"));
    }
    Ok(())
}

fn matches(re: &str, value: &str) -> bool {
    Regex::new(re).is_ok_and(|r| r.is_match(value))
}

/// Named formats (PVE::JSONSchema's register_format), the ones these paths use.
fn check_format(format: &str, value: &str) -> Result<(), String> {
    let ok = match format {
        "pve-node" => matches(r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$", value),
        "dns-name" => value.split('.').all(|l| matches(r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$", l)),
        "pve-vmid" => matches(r"^[1-9][0-9]{2,8}$", value),
        "pve-configid" => matches(r"^[a-z][a-z0-9_]{1,40}$", value),
        "pve-configid-list" => {
            value.split([',', ';', ' ']).filter(|s| !s.is_empty()).all(|id| matches(r"^[a-z][a-z0-9_\-]{1,40}$", id))
        }
        "pve-tag-list" => {
            let tags: Vec<&str> = value.split([';', ',', ' ']).filter(|s| !s.is_empty()).collect();
            !tags.is_empty() && tags.iter().all(|t| matches(r"^(?i)[a-z0-9_][a-z0-9_\-\+\.]*$", t))
        }
        "pve-storage-id" | "pve-poolid" | "pve-bridge-id" => matches(r"^[a-zA-Z][a-zA-Z0-9\-_.]*[a-zA-Z0-9]$", value),
        "pve-realm" => matches(r"^[A-Za-z][A-Za-z0-9\.\-_]+$", value),
        "mac-addr" => matches(r"^(?i)[a-f0-9][02468ace](?::[a-f0-9]{2}){5}$", value),
        "urlencoded" => !value.chars().any(|c| c.is_control()),
        // Formats these paths use that AgentLab never sends: accepted as strings.
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("value does not look like a valid {}", format.trim_start_matches("pve-"))) }
}

/// `key=value,key=value`, with a `default_key` for a bare value and `keyAlias`
/// shorthands (`virtio=MAC` for `model=virtio,macaddr=MAC`).
fn check_property_string(fields: &serde_json::Map<String, Value>, value: &str) -> Result<(), String> {
    let default_key = fields.iter().find(|(_, f)| is_true(f.get("default_key"))).map(|(k, _)| k.clone());
    let mut seen = BTreeMap::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match &default_key {
                Some(k) => (k.clone(), part.to_owned()),
                None => {
                    return Err(format!(
                        "format error - value without key, but schema does not define a default key: '{part}'"
                    ));
                }
            },
        };
        let Some(field) = fields.get(&key) else {
            return Err(format!(
                "format error - {key}: property is not defined in schema and the schema does not allow additional properties"
            ));
        };
        if let Some(alias_of) = field.get("keyAlias").and_then(Value::as_str) {
            // `virtio=MAC`: the key is the value of `model`, the value is `macaddr`.
            let target = field.get("alias").and_then(Value::as_str).unwrap_or_default();
            seen.insert(alias_of.to_owned(), key.clone());
            seen.insert(target.to_owned(), val.clone());
            if let Some(f) = fields.get(target) {
                check_value(f, &val).map_err(|e| format!("format error - {target}: {e}"))?;
            }
            continue;
        }
        check_value(field, &val).map_err(|e| format!("format error - {key}: {e}"))?;
        if seen.insert(key.clone(), val).is_some() {
            return Err(format!("format error - duplicate key in comma-separated list property: {key}"));
        }
    }
    for (name, field) in fields {
        if field.get("alias").is_none()
            && !is_true(field.get("optional"))
            && !seen.contains_key(name)
            && field.get("type").is_some()
        {
            return Err(format!("format error - {name}: property is missing and it is not optional"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn routes_and_validates_like_pve() {
        let s = Schema::load(9).unwrap();
        let (t, p) = s.route("/nodes/pve1/qemu/9000/clone").unwrap();
        assert_eq!(t, "/nodes/{node}/qemu/{vmid}/clone");
        let mut all = p.clone();
        all.extend(params(&[("newid", "100"), ("full", "0"), ("name", "sb-1")]));
        s.validate(&t, "POST", &all).unwrap();
        let mut bad = p.clone();
        bad.extend(params(&[("newid", "99"), ("full", "maybe"), ("nmae", "x")]));
        let errors = s.validate(&t, "POST", &bad).unwrap_err();
        assert_eq!(errors["newid"], "value must have a minimum value of 100");
        assert_eq!(errors["full"], "type check ('boolean') failed - got 'maybe'");
        assert!(errors["nmae"].starts_with("property is not defined in schema"));
    }

    #[test]
    fn property_strings_formats_and_enums() {
        let s = Schema::load(9).unwrap();
        let (t, mut p) = s.route("/nodes/pve1/qemu/100/config").unwrap();
        p.extend(params(&[("net0", "virtio,bridge=vmbr1"), ("tags", "agentlab;sb-0a1b"), ("memory", "512")]));
        s.validate(&t, "PUT", &p).unwrap();
        p.insert("net0".into(), "virtio,bridg=vmbr1".into());
        p.insert("tags".into(), "bad tag!".into());
        let errors = s.validate(&t, "PUT", &p).unwrap_err();
        assert!(errors["net0"].contains("bridg: property is not defined"), "{errors:?}");
        assert!(errors["tags"].contains("tag-list"), "{errors:?}");
        let (t, mut p) = s.route("/cluster/resources").unwrap();
        p.insert("type".into(), "vms".into());
        let errors = s.validate(&t, "GET", &p).unwrap_err();
        assert_eq!(errors["type"], "value 'vms' does not have a value in the enumeration 'vm, storage, node, sdn'");
    }
}
