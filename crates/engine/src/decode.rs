//! Manifest files to objects: multi-document YAML and JSON, `kind: List` flattened, empty documents
//! skipped. Every document is decoded on its own so one malformed document only costs itself.

use std::fmt;

use kube::api::DynamicObject;
use serde_json::Value;

use crate::error::EngineError;

/// One file of the manifest project at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub data: Vec<u8>,
}

impl ManifestFile {
    pub fn new(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.into(),
            data: data.into(),
        }
    }
}

/// Where an object came from, so a user can find it in Git.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectOrigin {
    pub path: String,
    /// Zero-based index of the document in its file (empty documents count, so the index matches
    /// the n-th `---` section a user sees).
    pub document_index: usize,
    /// Zero-based index in `items` when the document is a `kind: List`.
    pub list_item_index: Option<usize>,
}

impl fmt::Display for ObjectOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, document {}", self.path, self.document_index)?;
        if let Some(item) = self.list_item_index {
            write!(f, ", item {item}")?;
        }
        Ok(())
    }
}

/// A valid object (apiVersion, kind and metadata.name present) and its origin.
#[derive(Debug, Clone)]
pub struct DecodedObject {
    pub origin: ObjectOrigin,
    pub object: DynamicObject,
}

/// Decodes every `.yaml`, `.yml` and `.json` file; other files are ignored. Each document yields
/// either an object or an [`EngineError::InvalidDocument`], in file order.
pub fn decode_files(files: &[ManifestFile]) -> Vec<Result<DecodedObject, EngineError>> {
    let mut out = Vec::new();
    for file in files {
        let lower = file.path.to_ascii_lowercase();
        if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            decode_yaml(file, &mut out);
        } else if lower.ends_with(".json") {
            decode_json(file, &mut out);
        }
    }
    out
}

fn decode_yaml(file: &ManifestFile, out: &mut Vec<Result<DecodedObject, EngineError>>) {
    let origin = |document_index| ObjectOrigin {
        path: file.path.clone(),
        document_index,
        list_item_index: None,
    };
    let text = match std::str::from_utf8(&file.data) {
        Ok(text) => text,
        Err(e) => {
            out.push(Err(EngineError::InvalidDocument {
                origin: origin(0),
                line: None,
                reason: format!("not UTF-8: {e}"),
            }));
            return;
        }
    };
    for (document_index, document) in split_yaml_documents(text).into_iter().enumerate() {
        match serde_saphyr::from_str::<Value>(document.text) {
            Ok(value) => push_value(value, origin(document_index), out),
            Err(e) => out.push(Err(EngineError::InvalidDocument {
                origin: origin(document_index),
                // serde-saphyr counts lines from 1 within the document we gave it.
                line: e
                    .location()
                    .map(|l| l.line() + document.first_line.saturating_sub(1)),
                reason: first_line(&e.to_string()),
            })),
        }
    }
}

fn decode_json(file: &ManifestFile, out: &mut Vec<Result<DecodedObject, EngineError>>) {
    let origin = ObjectOrigin {
        path: file.path.clone(),
        document_index: 0,
        list_item_index: None,
    };
    match serde_json::from_slice::<Value>(&file.data) {
        Ok(value) => push_value(value, origin, out),
        Err(e) => out.push(Err(EngineError::InvalidDocument {
            origin,
            line: Some(e.line() as u64),
            reason: e.to_string(),
        })),
    }
}

/// serde-saphyr's messages can carry a multi-line source snippet; results want one line.
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

struct YamlDocument<'a> {
    text: &'a str,
    /// 1-based line of the document's first line in the file.
    first_line: u64,
}

/// Splits at `---` separator lines. Decoding documents one by one (instead of
/// `serde_saphyr::from_str_multiple`) keeps a syntax error from losing the other documents.
/// A `---` at column 0 cannot be inside a block scalar of an object, whose content is indented.
fn split_yaml_documents(text: &str) -> Vec<YamlDocument<'_>> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut start_line = 1u64;
    let mut offset = 0;
    let mut seen_separator = false;
    for (line_index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        let is_separator = content.starts_with("---")
            && content[3..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ' || c == '\t' || c == '#');
        if is_separator {
            let before = &text[start..offset];
            // Text before the first `---` is only a document when it has content.
            if seen_separator || has_content(before) {
                documents.push(YamlDocument {
                    text: before,
                    first_line: start_line,
                });
            }
            seen_separator = true;
            // Content after `--- ` on the same line belongs to the new document; keep the line
            // but blank the marker so line numbers stay right.
            start = offset + 3;
            start_line = line_index as u64 + 1;
        }
        offset += line.len();
    }
    let rest = &text[start..];
    if seen_separator || has_content(rest) {
        documents.push(YamlDocument {
            text: rest,
            first_line: start_line,
        });
    }
    documents
}

fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#') && line != "..."
    })
}

fn push_value(
    value: Value,
    origin: ObjectOrigin,
    out: &mut Vec<Result<DecodedObject, EngineError>>,
) {
    if value.is_null() {
        return; // An empty document (or one with only comments).
    }
    let is_list =
        value.get("kind").and_then(Value::as_str) == Some("List") && value.get("items").is_some();
    if is_list {
        match value.get("items") {
            Some(Value::Array(items)) => {
                for (index, item) in items.iter().enumerate() {
                    let item_origin = ObjectOrigin {
                        list_item_index: Some(index),
                        ..origin.clone()
                    };
                    if item.is_null() {
                        continue;
                    }
                    out.push(to_object(item.clone(), item_origin));
                }
            }
            Some(Value::Null) => {}
            _ => out.push(Err(invalid(origin, "items of a List must be a sequence"))),
        }
        return;
    }
    out.push(to_object(value, origin));
}

fn invalid(origin: ObjectOrigin, reason: &str) -> EngineError {
    EngineError::InvalidDocument {
        origin,
        line: None,
        reason: reason.to_string(),
    }
}

fn to_object(value: Value, origin: ObjectOrigin) -> Result<DecodedObject, EngineError> {
    if !value.is_object() {
        return Err(invalid(origin, "not a mapping"));
    }
    let non_empty_str =
        |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    if !non_empty_str(value.get("apiVersion")) {
        return Err(invalid(origin, "missing apiVersion"));
    }
    if !non_empty_str(value.get("kind")) {
        return Err(invalid(origin, "missing kind"));
    }
    if !non_empty_str(value.get("metadata").and_then(|m| m.get("name"))) {
        return Err(invalid(origin, "missing metadata.name"));
    }
    match serde_json::from_value::<DynamicObject>(value) {
        Ok(object) => Ok(DecodedObject { origin, object }),
        Err(e) => Err(invalid(origin, &format!("not a valid object: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &str, text: &str) -> Vec<Result<DecodedObject, EngineError>> {
        decode_files(&[ManifestFile::new(path, text)])
    }

    #[test]
    fn multi_document_yaml_skips_empty_documents_and_keeps_indices() {
        let text = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n...\n";
        let out = decode("dir/a.yaml", text);
        assert_eq!(out.len(), 2);
        let a = out[0].as_ref().unwrap();
        let b = out[1].as_ref().unwrap();
        assert_eq!(a.object.metadata.name.as_deref(), Some("a"));
        assert_eq!(a.origin.document_index, 0);
        assert_eq!(b.object.metadata.name.as_deref(), Some("b"));
        assert_eq!(b.origin.document_index, 2);
        assert_eq!(b.origin.path, "dir/a.yaml");
    }

    #[test]
    fn invalid_documents_are_reported_and_do_not_stop_the_others() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: ConfigMap\nmetadata: {name: b}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n---\napiVersion: v1\nkind: Secret\nmetadata: {}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: e}\n";
        let out = decode("x.yml", text);
        assert_eq!(out.len(), 5);
        assert!(out[0].is_ok());
        let err = out[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("x.yml, document 1") && err.contains("apiVersion"),
            "{err}"
        );
        match out[2].as_ref().unwrap_err() {
            EngineError::InvalidDocument { origin, line, .. } => {
                assert_eq!(origin.document_index, 2);
                // The broken flow sequence starts on line 11 of the file; the error is on or after it.
                assert!(line.is_some_and(|l| l >= 11), "{line:?}");
            }
            other => panic!("{other}"),
        }
        let err = out[3].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("document 3") && err.contains("metadata.name"),
            "{err}"
        );
        assert_eq!(out[4].as_ref().unwrap().origin.document_index, 4);
    }

    #[test]
    fn kind_list_is_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: b}\n";
        let out = decode("l.yaml", text);
        let names: Vec<_> = out
            .iter()
            .map(|o| {
                let o = o.as_ref().unwrap();
                (
                    o.object.metadata.name.clone().unwrap(),
                    o.origin.list_item_index,
                )
            })
            .collect();
        assert_eq!(names, [("a".into(), Some(0)), ("b".into(), Some(1))]);
    }

    #[test]
    fn json_files_and_json_lists() {
        let one =
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":"v"}}"#;
        let list = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"b"}}]}"#;
        let out = decode_files(&[
            ManifestFile::new("a.json", one),
            ManifestFile::new("b.JSON", list),
            ManifestFile::new("c.json", "{ nope"),
            ManifestFile::new("README.md", "not a manifest"),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap().object.data["data"]["k"], "v");
        assert_eq!(
            out[1].as_ref().unwrap().object.metadata.name.as_deref(),
            Some("b")
        );
        let err = out[2].as_ref().unwrap_err().to_string();
        assert!(err.starts_with("c.json, document 0, line 1"), "{err}");
    }

    #[test]
    fn separator_with_content_on_the_same_line() {
        let out = decode(
            "a.yaml",
            "--- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n",
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].is_ok());
    }
}
