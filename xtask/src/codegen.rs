//! `cargo xtask codegen [--check]`: the generated code of the crates built from `.proto` files: the protocol
//! crate from `proto/`, the Hubble client from `proto/hubble/`.

use anyhow::{Context, bail};

/// (proto directory, the crate's committed generated directory), relative to the repository root.
const TARGETS: &[(&str, &str)] = &[
    ("proto", "crates/protocol/src/generated"),
    ("proto/hubble", "crates/hubble/src/generated"),
];

pub fn run(check: bool) -> anyhow::Result<()> {
    let root = crate::repo_root();
    for (proto, generated) in TARGETS {
        let proto_dir = root.join(proto);
        let committed = root.join(generated);
        if check {
            let stale = protocol_codegen::stale_files(&proto_dir, &committed)
                .with_context(|| format!("generating code from {proto}/"))?;
            if !stale.is_empty() {
                bail!(
                    "generated code in {generated} is stale ({}); run `cargo xtask codegen`",
                    stale.join(", ")
                );
            }
            println!("{generated} is up to date");
        } else {
            protocol_codegen::generate(&proto_dir, &committed)
                .with_context(|| format!("generating code from {proto}/"))?;
            println!("wrote {}", committed.display());
        }
    }
    Ok(())
}
