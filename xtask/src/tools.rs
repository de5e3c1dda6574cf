//! The pinned tools the test infrastructure runs, built from their Go modules into a cache outside the
//! repository (`$GITOPS_TOOLS_CACHE`, default `~/.cache/gitops-tools`), one directory per tool and version.
//! A tool is built only when its directory is missing; a build goes to `<dir>.partial` and is renamed when
//! complete, so an interrupted build is never taken for a finished one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::repo_root;

pub const KUBERNETES_VERSION: &str = "v1.34.4";
pub const ETCD_VERSION: &str = "v3.6.16";
pub const KWOK_VERSION: &str = "v0.8.0";
pub const HELM_VERSION: &str = "v3.22.0";
pub const GITEA_VERSION: &str = "v1.26.0";
pub const KIND_VERSION: &str = "v0.30.0";
/// Prometheus's Go module version (v0.3xx.y is Prometheus 3.xx.y); only its `promtool` is built.
pub const PROMTOOL_VERSION: &str = "v0.316.0";
/// Alertmanager's Go module version; the network-alerts tests post to and read back from the real server.
pub const ALERTMANAGER_VERSION: &str = "v0.35.0";

/// Where a tool's Go code comes from.
enum Source {
    /// A tools module committed under `tools/<dir>` whose go.mod pins the upstream module.
    ToolsModule(&'static str),
    /// The upstream module itself, built as the main module from its downloaded source, because its go.mod
    /// has `replace` directives that only apply to the main module.
    MainModule(&'static str),
    /// Like [`Source::MainModule`], from a writable copy of the source that `prepare` completes first
    /// (files its release process generates and its module zip leaves out).
    PreparedMain {
        module: &'static str,
        prepare: fn(source: &Path) -> Result<()>,
    },
}

/// One pinned tool: the binaries it provides and how to build them.
pub struct Tool {
    pub name: &'static str,
    pub version: &'static str,
    source: Source,
    /// (Go package, binary name).
    binaries: &'static [(&'static str, &'static str)],
    tags: &'static str,
    ldflags: fn() -> String,
    /// Copies data files the binaries need at run time from the module source into the tool directory.
    data: fn(module_dir: &Path, out: &Path) -> Result<()>,
}

fn no_ldflags() -> String {
    String::new()
}

fn no_data(_: &Path, _: &Path) -> Result<()> {
    Ok(())
}

/// Without these the binaries call themselves v0.0.0-master, and version-skew checks and `kubectl version`
/// are meaningless.
fn kubernetes_ldflags() -> String {
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or_default();
    ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
        .iter()
        .map(|pkg| {
            format!(
                "-X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} \
                 -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn gitea_ldflags() -> String {
    let version = GITEA_VERSION.trim_start_matches('v');
    format!("-X main.Version={version} -X 'main.Tags=sqlite sqlite_unlock_notify'")
}

/// kwok from v0.8 runs no stages unless given some: node initialisation and heartbeat (so nodes are Ready and
/// stay so), and the fast pod stages (pods become Running, completed pods Succeeded, deleted pods go away).
pub const KWOK_STAGES: &[&str] = &[
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
];

fn kwok_data(module_dir: &Path, out: &Path) -> Result<()> {
    let stages = out.join("stages");
    std::fs::create_dir_all(&stages)?;
    for stage in KWOK_STAGES {
        let from = module_dir.join(stage);
        let name = Path::new(stage).file_name().context("stage file name")?;
        std::fs::copy(&from, stages.join(name))
            .with_context(|| format!("copy {}", from.display()))?;
    }
    Ok(())
}

/// Gitea built without the `bindata` tag reads templates and options from its work path, which defaults to
/// the binary's directory.
fn gitea_data(module_dir: &Path, out: &Path) -> Result<()> {
    for dir in ["templates", "options", "public"] {
        copy_dir(&module_dir.join(dir), &out.join(dir))?;
    }
    Ok(())
}

/// Gives the owner write permission on everything under `dir` (files copied from the module cache are
/// read-only, which would stop both `prepare` and the removal of an old copy).
fn make_writable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let mut permissions = entry.metadata()?.permissions();
        permissions.set_mode(permissions.mode() | 0o200);
        std::fs::set_permissions(&path, permissions)?;
        if entry.file_type()?.is_dir() {
            make_writable(&path)?;
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub const KUBERNETES: Tool = Tool {
    name: "kubernetes",
    version: KUBERNETES_VERSION,
    source: Source::ToolsModule("kubernetes"),
    binaries: &[
        ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
        (
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-controller-manager",
        ),
        ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
        ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
    ],
    tags: "",
    ldflags: kubernetes_ldflags,
    data: no_data,
};

pub const ETCD: Tool = Tool {
    name: "etcd",
    version: ETCD_VERSION,
    source: Source::ToolsModule("etcd"),
    binaries: &[("go.etcd.io/etcd/server/v3", "etcd")],
    tags: "",
    ldflags: no_ldflags,
    data: no_data,
};

pub const KWOK: Tool = Tool {
    name: "kwok",
    version: KWOK_VERSION,
    source: Source::ToolsModule("kwok"),
    binaries: &[("sigs.k8s.io/kwok/cmd/kwok", "kwok")],
    tags: "",
    ldflags: no_ldflags,
    data: kwok_data,
};

pub const HELM: Tool = Tool {
    name: "helm",
    version: HELM_VERSION,
    source: Source::ToolsModule("helm"),
    binaries: &[("helm.sh/helm/v3/cmd/helm", "helm")],
    tags: "",
    ldflags: no_ldflags,
    data: no_data,
};

pub const GITEA: Tool = Tool {
    name: "gitea",
    version: GITEA_VERSION,
    source: Source::MainModule("code.gitea.io/gitea"),
    binaries: &[(".", "gitea")],
    tags: "sqlite sqlite_unlock_notify",
    ldflags: gitea_ldflags,
    data: gitea_data,
};

/// `promtool check metrics`, the reference linter of the Prometheus text format, for the metrics tests. Built
/// from the upstream module as main module (its go.mod pins its dependencies); `remove_all_sd` leaves out the
/// cloud service-discovery plugins, which `check metrics` never uses and which would triple the build.
pub const PROMTOOL: Tool = Tool {
    name: "promtool",
    version: PROMTOOL_VERSION,
    source: Source::MainModule("github.com/prometheus/prometheus"),
    binaries: &[("./cmd/promtool", "promtool")],
    tags: "remove_all_sd",
    ldflags: promtool_ldflags,
    data: no_data,
};

fn promtool_ldflags() -> String {
    format!("-X github.com/prometheus/common/version.Version={PROMTOOL_VERSION}")
}

/// Alertmanager, the receiver kas forwards network-policy alerts to; the kas tests read the alerts back
/// through its v2 API. Built as main module like promtool: its go.mod pins its dependencies.
pub const ALERTMANAGER: Tool = Tool {
    name: "alertmanager",
    version: ALERTMANAGER_VERSION,
    source: Source::PreparedMain {
        module: "github.com/prometheus/alertmanager",
        prepare: alertmanager_ui_placeholder,
    },
    binaries: &[("./cmd/alertmanager", "alertmanager")],
    tags: "",
    ldflags: alertmanager_ldflags,
    data: no_data,
};

/// Alertmanager embeds its web UI from `ui/app/dist`, which its release builds with npm and Elm and its
/// module zip leaves out. The tests use only the v2 API, so a placeholder page stands in for the UI (the
/// only stand-in in this build; the API and everything behind it are Alertmanager's own code).
fn alertmanager_ui_placeholder(source: &Path) -> Result<()> {
    for ui in ["elm", "mantine"] {
        let dir = source.join("ui/app/dist").join(ui);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("index.html"),
            "<!doctype html><title>Alertmanager</title><p>Built without its web UI; use /api/v2.</p>\n",
        )?;
    }
    std::fs::write(source.join("ui/app/dist/elm/favicon.ico"), b"")?;
    Ok(())
}

fn alertmanager_ldflags() -> String {
    format!(
        "-X github.com/prometheus/common/version.Version={}",
        ALERTMANAGER_VERSION.trim_start_matches('v')
    )
}

/// Only the Docker backend uses kind.
pub const KIND: Tool = Tool {
    name: "kind",
    version: KIND_VERSION,
    source: Source::ToolsModule("kind"),
    binaries: &[("sigs.k8s.io/kind", "kind")],
    tags: "",
    ldflags: no_ldflags,
    data: no_data,
};

/// The tools the local backend needs, cheapest first so a cold cache gets the cluster's pieces early.
pub const LOCAL_BACKEND: &[&Tool] = &[
    &ETCD,
    &KUBERNETES,
    &KWOK,
    &GITEA,
    &HELM,
    &PROMTOOL,
    &ALERTMANAGER,
];

pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("GITOPS_TOOLS_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("gitops-tools")
}

impl Tool {
    pub fn dir(&self) -> PathBuf {
        cache_root().join(format!("{}-{}", self.name, self.version))
    }

    /// The path of one of this tool's binaries (built or not).
    pub fn bin(&self, binary: &str) -> PathBuf {
        self.dir().join(binary)
    }

    pub fn is_built(&self) -> bool {
        self.dir().is_dir()
    }

    /// Builds the tool unless its cache directory exists; returns that directory.
    pub fn ensure(&self) -> Result<PathBuf> {
        let dir = self.dir();
        if dir.is_dir() {
            return Ok(dir);
        }
        let partial = PathBuf::from(format!("{}.partial", dir.display()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        let started = Instant::now();
        eprintln!(
            "==> building {} {} into {} (first time only; this takes minutes)",
            self.name,
            self.version,
            dir.display()
        );
        let (work_dir, module_dir) = self.source_dirs()?;
        for (package, binary) in self.binaries {
            self.go_build(&work_dir, package, &partial.join(binary))?;
        }
        (self.data)(&module_dir, &partial)?;
        std::fs::rename(&partial, &dir)?;
        if matches!(self.source, Source::PreparedMain { .. }) && work_dir.exists() {
            make_writable(&work_dir)?;
            std::fs::remove_dir_all(&work_dir)?;
        }
        eprintln!(
            "==> built {} {} in {:.0?}",
            self.name,
            self.version,
            started.elapsed()
        );
        Ok(dir)
    }

    /// (directory to run `go build` in, the upstream module's source directory).
    fn source_dirs(&self) -> Result<(PathBuf, PathBuf)> {
        match self.source {
            Source::ToolsModule(dir) => {
                let work_dir = repo_root().join("tools").join(dir);
                let upstream = self.binaries[0].0;
                let module_dir =
                    go_output(&work_dir, &["list", "-f", "{{.Module.Dir}}", upstream])?;
                Ok((work_dir, PathBuf::from(module_dir)))
            }
            Source::MainModule(module) => {
                let dir = download_module_source(module, self.version)?;
                Ok((dir.clone(), dir))
            }
            Source::PreparedMain { module, prepare } => {
                let downloaded = download_module_source(module, self.version)?;
                // The module cache is read-only: build from a copy beside the tool's directory.
                let copy = PathBuf::from(format!("{}.src", self.dir().display()));
                if copy.exists() {
                    make_writable(&copy)?;
                    std::fs::remove_dir_all(&copy)?;
                }
                copy_dir(&downloaded, &copy)?;
                make_writable(&copy)?;
                prepare(&copy)?;
                Ok((copy.clone(), copy))
            }
        }
    }

    fn go_build(&self, work_dir: &Path, package: &str, output: &Path) -> Result<()> {
        let log_path = output.with_extension("build.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new("nice");
        // nice: the machine's cores are shared with people compiling; a tool build may wait.
        command.args(["-n", "19", "go", "build", "-v", "-trimpath"]);
        if !self.tags.is_empty() {
            command.args(["-tags", self.tags]);
        }
        command.arg(format!("-ldflags=-s -w {}", (self.ldflags)()));
        command.arg("-o").arg(output).arg(package);
        // GOWORK=off: a module's own go.work (Prometheus ships one naming directories its module zip
        // leaves out) must not take part; each tool builds from its go.mod alone.
        command
            .current_dir(work_dir)
            .env("GOFLAGS", "-buildvcs=false")
            .env("GOWORK", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .context("run `go` (is Go installed and on PATH?)")?;
        let stderr = child.stderr.take().context("go stderr")?;
        let started = Instant::now();
        let mut compiled = 0usize;
        let mut log = std::io::BufWriter::new(log);
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            use std::io::Write;
            writeln!(log, "{line}")?;
            // `go build -v` names each package as it compiles it: a live count is the progress bar.
            compiled += 1;
            if compiled.is_multiple_of(100) {
                eprintln!(
                    "    {} {}: {compiled} packages compiled, {:.0?} (last: {line})",
                    self.name,
                    package,
                    started.elapsed()
                );
            }
        }
        let status = child.wait()?;
        drop(log);
        if !status.success() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            bail!(
                "go build {package} for {} {} failed ({status}); log {}:\n{}",
                self.name,
                self.version,
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!(
            "    {} {}: done in {:.0?}",
            self.name,
            output.display(),
            started.elapsed()
        );
        Ok(())
    }
}

/// Downloads `module@version` through the Go module proxy and returns its (read-only) source directory.
fn download_module_source(module: &str, version: &str) -> Result<PathBuf> {
    let json = go_output(
        Path::new("."),
        &["mod", "download", "-json", &format!("{module}@{version}")],
    )?;
    let info: serde_json::Value =
        serde_json::from_str(&json).context("go mod download -json output")?;
    match info["Dir"].as_str() {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => bail!("go mod download {module}@{version}: {}", info["Error"]),
    }
}

fn go_output(dir: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("go")
        .args(args)
        .current_dir(dir)
        .env("GOFLAGS", "-buildvcs=false")
        .env("GOWORK", "off")
        .output()
        .context("run `go` (is Go installed and on PATH?)")?;
    if !output.status.success() {
        bail!(
            "go {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Builds every missing tool of the local backend.
pub fn ensure_local_backend() -> Result<()> {
    for tool in LOCAL_BACKEND {
        tool.ensure()?;
    }
    Ok(())
}

/// `cargo xtask tools status`: what is built, where, and how large.
pub fn print_status() {
    eprintln!("tools cache: {}", cache_root().display());
    for tool in LOCAL_BACKEND.iter().chain([&&KIND]) {
        let state = if tool.is_built() { "built" } else { "missing" };
        eprintln!(
            "  {:<11} {:<9} {state:<8} {}",
            tool.name,
            tool.version,
            tool.dir().display()
        );
    }
}
