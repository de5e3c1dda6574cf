//! `cargo xtask codegen [--check]`: the protocol crate's generated code, from `proto/`.

use anyhow::{Context, bail};

pub fn run(check: bool) -> anyhow::Result<()> {
    let root = crate::repo_root();
    let proto_dir = root.join("proto");
    let committed = root.join("crates/protocol/src/generated");
    if check {
        let stale = protocol_codegen::stale_files(&proto_dir, &committed)
            .context("generating protocol code")?;
        if !stale.is_empty() {
            bail!(
                "generated protocol code is stale ({}); run `cargo xtask codegen`",
                stale.join(", ")
            );
        }
        println!("protocol code is up to date");
    } else {
        protocol_codegen::generate(&proto_dir, &committed).context("generating protocol code")?;
        println!("wrote {}", committed.display());
    }
    Ok(())
}
