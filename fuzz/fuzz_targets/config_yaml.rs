//! `config.yaml` from Git: any bytes within the size limit must parse or give an error, never panic, hang or
//! blow up memory (alias bombs, deep nesting, odd numbers).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gitops_config::agent::AgentConfig::parse(".gitlab/agents/fuzz/config.yaml", data, 128 * 1024);
});
