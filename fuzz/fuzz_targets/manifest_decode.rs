//! Manifest files: any bytes in a `.yaml` or `.json` file decode into objects and per-document errors, never a
//! panic; every error names the file.
#![no_main]

use gitops_engine::{ManifestFile, decode_files};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the file type, so both decoders are fuzzed from one corpus.
    let (path, body) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("deploy/app.json", rest),
        Some((_, rest)) => ("deploy/app.yaml", rest),
        None => ("deploy/app.yaml", data),
    };
    for result in decode_files(&[ManifestFile::new(path, body.to_vec())]) {
        if let Err(e) = result {
            let message = e.to_string();
            assert!(message.contains(path), "error does not name the file: {message}");
        }
    }
});
