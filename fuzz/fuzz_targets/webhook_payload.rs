//! Push webhooks: any body with any signature header is verified or refused and any verified body yields a
//! project path or an error, never a panic.
#![no_main]

use http::HeaderMap;
use kas::webhooks::{Forge, pushed_project, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    let forge = match selector % 3 {
        0 => Forge::Gitea,
        1 => Forge::GitHub,
        _ => Forge::GitLab,
    };
    // The first line (lossy) is the signature header's value, the rest the body.
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let (signature, body) = rest.split_at(split);
    let mut headers = HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(signature) {
        let name = match forge {
            Forge::Gitea => "x-gitea-signature",
            Forge::GitHub => "x-hub-signature-256",
            Forge::GitLab => "x-gitlab-token",
        };
        headers.insert(name, value);
    }
    let _ = verify(forge, Some("fuzz-secret"), &headers, body);
    let _ = pushed_project(forge, body);
});
