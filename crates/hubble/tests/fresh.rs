//! The committed generated code matches `proto/`.

use std::path::Path;

#[test]
fn generated_code_is_fresh() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stale = protocol_codegen::stale_files(
        &crate_dir.join("../../proto/hubble"),
        &crate_dir.join("src/generated"),
    )
    .expect("codegen runs");
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo xtask codegen`"
    );
}
