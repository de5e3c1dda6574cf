//! `paths[]` selection: arbitrary globs, file entries and tree listings must select or give an error naming
//! the entry, never panic; nothing under a dot-directory is selected by a glob; limits hold.
#![no_main]

use gitops_config::server::ManifestLimits;
use kas::manifests::{PathSelector, select::select};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Layout: selectors, then a line "---", then one listed file per line (path and size are derived).
    let (head, tail) = text.split_once("\n---\n").unwrap_or((&text, ""));
    let selectors: Vec<PathSelector> = head
        .lines()
        .map(|l| match l.strip_prefix("file:") {
            Some(f) => PathSelector::File(f.to_owned()),
            None => PathSelector::Glob(l.to_owned()),
        })
        .collect();
    let files: Vec<(String, u64)> = tail
        .lines()
        .map(|l| (l.to_owned(), l.len() as u64 * 1000))
        .collect();
    let limits = ManifestLimits {
        max_file_size: 50_000,
        max_total_size: 200_000,
        max_files: 50,
        max_paths: 20,
    };
    if let Ok(selected) = select(&files, &selectors, &limits) {
        assert!(selected.len() <= limits.max_files);
        for path in &selected {
            assert!(files.iter().any(|(p, _)| p == path), "selected a file not listed: {path}");
        }
    }
});
