//! Lints of `docker/Dockerfile` for what matters in the images, since no engine builds them here: bases
//! pinned by digest, runtime stages without a shell (distroless static, nothing run in them, exec-form
//! entrypoints, only the one binary copied in), a numeric non-root USER matching the charts, a locked release
//! build, the charts' ports exposed, and a `.dockerignore` that keeps build output and Git history out.

use std::collections::BTreeMap;

use super::*;

fn read(path: &str) -> String {
    let path = crate::repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One instruction: keyword (upper case) and its arguments, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// A stage: its name, its base image (ARG defaults substituted) and its instructions.
#[derive(Debug)]
struct Stage {
    name: String,
    base: String,
    instructions: Vec<Instruction>,
}

fn parse(dockerfile: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(rest) => {
                current.push_str(rest);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let rest = rest.trim().to_owned();
        if keyword == "FROM" {
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--platform"))
                .collect();
            let mut base = words[0].to_owned();
            for (name, value) in &args {
                base = base.replace(&format!("${{{name}}}"), value);
            }
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                _ => String::new(),
            };
            stages.push(Stage {
                name,
                base,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(Instruction {
                keyword,
                args: rest,
            });
        } else if keyword == "ARG"
            && let Some((name, value)) = rest.split_once('=')
        {
            args.insert(name.to_owned(), value.to_owned());
        }
    }
    stages
}

fn stages() -> Vec<Stage> {
    parse(&read("docker/Dockerfile"))
}

fn stage<'a>(stages: &'a [Stage], name: &str) -> &'a Stage {
    stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name} in docker/Dockerfile"))
}

fn instructions<'a>(stage: &'a Stage, keyword: &str) -> Vec<&'a str> {
    stage
        .instructions
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

fn is_digest_pinned(image: &str) -> bool {
    let Some((name, digest)) = image.split_once("@sha256:") else {
        return false;
    };
    let tagged = name
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    tagged && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn dockerfile_every_base_image_is_pinned_by_tag_and_digest() {
    let stages = stages();
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert!(stages.len() >= 3, "{stages:?}");
    for stage in &stages {
        if names.contains(&stage.base.as_str()) {
            continue;
        }
        assert!(
            is_digest_pinned(&stage.base),
            "stage {:?}: base {:?} is not pinned as name:tag@sha256:<digest>",
            stage.name,
            stage.base
        );
    }
    assert!(!is_digest_pinned("rust:1.95-alpine"));
    assert!(!is_digest_pinned("rust@sha256:abc"));
}

#[test]
fn dockerfile_runtime_stages_have_no_shell_and_only_their_binary() {
    let stages = stages();
    for binary in BINARIES {
        let runtime = stage(&stages, binary);
        assert!(
            runtime.base.contains("/distroless/static") && runtime.base.contains(":nonroot@"),
            "{binary}: runtime base {:?} must be distroless static :nonroot (no shell, no libc)",
            runtime.base
        );
        for keyword in ["RUN", "SHELL", "ADD", "ONBUILD", "HEALTHCHECK"] {
            assert!(
                instructions(runtime, keyword).is_empty(),
                "{binary}: {keyword} in a runtime stage needs a shell or fetches content"
            );
        }
        let copies = instructions(runtime, "COPY");
        assert_eq!(
            copies,
            [format!(
                "--from=build --chown=0:0 --chmod=0555 /out/{binary} /usr/local/bin/{binary}"
            )],
            "{binary}: exactly its binary, root-owned and read-only, from the build stage"
        );
        let entrypoint = instructions(runtime, "ENTRYPOINT");
        assert_eq!(
            entrypoint,
            [format!("[\"/usr/local/bin/{binary}\"]")],
            "{binary}: exec form (a shell form needs /bin/sh)"
        );
        for cmd in instructions(runtime, "CMD") {
            assert!(
                serde_json::from_str::<Vec<String>>(cmd).is_ok(),
                "{binary}: CMD {cmd} is not exec form"
            );
        }
        let labels = instructions(runtime, "LABEL").join(" ");
        for label in ["source", "version", "revision", "licenses"] {
            assert!(
                labels.contains(&format!("org.opencontainers.image.{label}=")),
                "{binary}: OCI label {label} missing"
            );
        }
    }
}

#[test]
fn dockerfile_user_is_numeric_65532_as_the_charts_run_it() {
    let stages = stages();
    for binary in BINARIES {
        let users = instructions(stage(&stages, binary), "USER");
        assert_eq!(
            users.last().copied(),
            Some("65532:65532"),
            "{binary}: the last USER must be numeric (runAsNonRoot can verify only a number)"
        );
        let values = read(&format!("charts/{binary}/values.yaml"));
        assert!(
            values.contains("runAsUser: 65532") && values.contains("runAsGroup: 65532"),
            "charts/{binary} runs as another user than the image"
        );
    }
    let generate = read("crates/agentk/src/generate.rs");
    assert!(
        generate.contains("runAsUser: 65532"),
        "agentk generate runs as another user than the image"
    );
}

#[test]
fn dockerfile_builds_both_binaries_locked_and_static() {
    let stages = stages();
    let build = stage(&stages, "build");
    assert!(
        build.base.contains("rust:") && build.base.contains("-alpine@"),
        "{}",
        build.base
    );
    let runs = instructions(build, "RUN").join("\n");
    assert!(
        runs.contains("cargo build --release --locked -p kas -p agentk"),
        "{runs}"
    );
    for binary in BINARIES {
        assert!(runs.contains(&format!("target/release/{binary}")), "{runs}");
    }
    assert_eq!(
        instructions(build, "ENV"),
        ["CARGO_PROFILE_RELEASE_DEBUG=false"],
        "no debug info in the images"
    );
    let toolchain = read("Cargo.toml");
    let rust_version = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    assert!(
        build.base.contains(&format!("rust:{rust_version}")),
        "the builder {} is not the workspace's rust-version {rust_version}",
        build.base
    );
}

#[test]
fn dockerfile_exposes_the_ports_the_charts_use() {
    let stages = stages();
    let kas_values = read("charts/kas/values.yaml");
    let exposed = instructions(stage(&stages, "kas"), "EXPOSE").join(" ");
    for (key, port) in [
        ("agentPort", "8150"),
        ("apiPort", "8080"),
        ("k8sProxyPort", "8154"),
        ("port", "8151"),
    ] {
        assert!(
            kas_values.contains(&format!("{key}: {port}")),
            "kas values {key}"
        );
        assert!(
            exposed.split_whitespace().any(|p| p == port),
            "kas EXPOSE {port}"
        );
    }
    let agentk_values = read("charts/agentk/values.yaml");
    assert!(agentk_values.contains("port: 8080"));
    assert_eq!(instructions(stage(&stages, "agentk"), "EXPOSE"), ["8080"]);
}

#[test]
fn dockerignore_keeps_build_output_and_git_history_out() {
    let ignore = read(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for pattern in ["target/", ".git/"] {
        assert!(
            lines.contains(&pattern),
            "{pattern} missing from .dockerignore"
        );
    }
    // What the build needs stays in.
    for needed in ["Cargo.lock", "Cargo.toml", "crates", "proto"] {
        assert!(
            !lines.iter().any(|l| l.trim_end_matches('/') == needed),
            "{needed} must not be ignored"
        );
    }
}

#[test]
fn checksums_are_what_sha256sum_checks() {
    let dir = tempfile_dir();
    let a = dir.join("kas-0.1.0-x86_64-unknown-linux-gnu");
    let b = dir.join("agentk-0.1.0-x86_64-unknown-linux-gnu");
    std::fs::write(&a, b"abc").unwrap();
    std::fs::write(&b, b"agentk").unwrap();
    let sums = write_checksums(&dir, &[a, b]).unwrap();
    let text = std::fs::read_to_string(&sums).unwrap();
    assert!(
        text.starts_with(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  kas-0.1.0-x86_64-unknown-linux-gnu\n"
        ),
        "{text}"
    );
    // The real coreutils tool accepts the file, and refuses it once a binary changes.
    let check = || {
        Command::new("sha256sum")
            .args(["--check", "--strict", "SHA256SUMS"])
            .current_dir(&dir)
            .output()
            .expect("sha256sum (coreutils) is installed")
    };
    assert!(check().status.success());
    std::fs::write(
        dir.join("agentk-0.1.0-x86_64-unknown-linux-gnu"),
        b"tampered",
    )
    .unwrap();
    assert!(!check().status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xtask-dist-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn image_fails_clearly_without_an_engine() {
    let missing = require_engine("gitops-no-such-engine")
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("`gitops-no-such-engine` is not installed")
            && missing.contains("cargo xtask dist"),
        "{missing}"
    );
    // An engine whose `info` fails (a client without a daemon, as on this machine).
    let down = require_engine("false").unwrap_err().to_string();
    assert!(
        down.contains("no container engine answers `false info`")
            && down.contains("cargo xtask dist"),
        "{down}"
    );
}

/// The charts and `agentk generate` name the images `cargo xtask image` builds, tagged with the crate
/// version (the charts' appVersion), so a release's images and charts agree.
#[test]
fn charts_and_generate_default_to_the_images_image_builds() {
    for binary in BINARIES {
        let chart = read(&format!("charts/{binary}/Chart.yaml"));
        assert!(
            chart.contains(&format!("appVersion: \"{VERSION}\"")),
            "charts/{binary}/Chart.yaml appVersion is not {VERSION}"
        );
        let values = read(&format!("charts/{binary}/values.yaml"));
        assert!(
            values.contains(&format!("  repository: {IMAGE_PREFIX}/{binary}\n")),
            "charts/{binary} image.repository is not {IMAGE_PREFIX}/{binary}"
        );
    }
    let generate = read("crates/agentk/src/generate.rs");
    assert!(generate.contains(&format!(
        "pub const DEFAULT_IMAGE_REPOSITORY: &str = \"{IMAGE_PREFIX}/agentk\";"
    )));
    assert!(generate.contains("pub const DEFAULT_IMAGE_TAG: &str = env!(\"CARGO_PKG_VERSION\");"));
}
