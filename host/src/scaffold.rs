//! `rehydra new --lang rust|js|python NAME`: creates a plugin project that
//! builds with one command (`make`) and passes its generated tests
//! (`make test`).
//!
//! Every project is a counter aggregate named `NAME` (streams
//! `NAME-with-underscores-<id>`), with a README, a Makefile and tests. The
//! templates live in `host/templates/` and are compiled into the binary, as
//! are the SDK files a JS or Python project carries (`guest-sdk/js`,
//! `guest-sdk/python`, `wit/`), so a project is self-contained and matches
//! the host that created it. A Rust project depends on the Rust SDK by path:
//! the `guest-sdk` directory of the checkout this binary was built from, or
//! `--sdk PATH`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

/// The language of a new plugin project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust, with the `rehydra-guest` SDK (cargo, wasm32-wasip2).
    Rust,
    /// JavaScript, built with componentize-js (Node 20.6+ and npm).
    Js,
    /// Python, built with componentize-py (Python 3.10+ with venv).
    Python,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "Rust",
            Lang::Js => "JavaScript",
            Lang::Python => "Python",
        })
    }
}

/// The arguments of `rehydra new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The language of the plugin.
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// The aggregate type, which also names the project's directory:
    /// letters, digits, '-' and '_', starting with a letter.
    pub name: String,
    /// Where to create the project's directory (default: here).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Rust only: the Rust SDK (`guest-sdk` of a Rehydra checkout); default:
    /// the checkout this binary was built from.
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

/// A file of a new project: its path inside the project and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectFile {
    /// The path, relative to the project's directory, with `/` separators.
    pub path: String,
    /// The contents.
    pub contents: String,
}

/// Runs `rehydra new`: writes the project and says what to do next.
pub fn run(args: NewArgs) -> ExitCode {
    match create(&args) {
        Ok(dir) => {
            let name = &args.name;
            println!(
                "created {} ({} plugin `{name}`, streams {}-<id>)",
                dir.display(),
                args.lang,
                stream_prefix(name)
            );
            println!("next:");
            println!("  cd {}", dir.display());
            println!("  make        # builds {name}.wasm");
            println!("  make test   # runs the generated tests");
            println!("  then copy {name}.wasm into the plugin directory of `rehydra run`");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rehydra: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Creates the project `args.name` under `args.dir`; returns its directory.
/// Refuses to write into a directory that exists and is not empty.
pub fn create(args: &NewArgs) -> anyhow::Result<PathBuf> {
    check_name(&args.name)?;
    let dir = args.dir.join(&args.name);
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} already exists and is not empty: choose another NAME, or --dir elsewhere",
                dir.display()
            );
        }
    }
    let sdk = match args.lang {
        Lang::Rust => Some(rust_sdk(args.sdk.as_deref())?),
        Lang::Js | Lang::Python => None,
    };
    let files = project_files(args.lang, &args.name, sdk.as_deref())?;
    for file in &files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &file.contents)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// A NAME is an aggregate type, a directory and (for Rust) a crate name.
fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !starts_with_letter
        || name.len() > 64
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!(
            "{name:?} cannot name a plugin: use 1-64 ASCII letters, digits, '-' and '_', \
             starting with a letter (e.g. bank-account)"
        );
    }
    Ok(())
}

/// Streams are `<prefix>-<id>`, so the prefix has no `-`.
fn stream_prefix(name: &str) -> String {
    name.replace('-', "_")
}

/// The Rust SDK directory to depend on, made absolute so that the project
/// builds wherever it is.
fn rust_sdk(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (path, origin) = match given {
        Some(p) => (p.to_path_buf(), "--sdk"),
        None => (
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("guest-sdk"),
            "the checkout rehydra was built from",
        ),
    };
    if !path.join("Cargo.toml").is_file() {
        bail!(
            "no Rust SDK at {} ({origin}): pass --sdk PATH to the guest-sdk directory of a \
             Rehydra checkout",
            path.display()
        );
    }
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}

/// Replaces the `{{key}}` placeholders of a template.
fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (key, value) in vars {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    out
}

/// A TOML basic string's contents for `s` (a path may hold `\` or `"`).
fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

const WIT: &str = include_str!("../../wit/aggregate.wit");
const TOOLCHAIN: &str = include_str!("../../rust-toolchain.toml");

const RUST_TEMPLATES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    (
        "rust-toolchain.toml",
        include_str!("../templates/rust/rust-toolchain.toml"),
    ),
    ("Makefile", include_str!("../templates/rust/Makefile")),
    ("README.md", include_str!("../templates/rust/README.md")),
    (".gitignore", include_str!("../templates/rust/gitignore")),
];

const JS_TEMPLATES: &[(&str, &str)] = &[
    ("aggregate.js", include_str!("../templates/js/aggregate.js")),
    (
        "aggregate.test.mjs",
        include_str!("../templates/js/aggregate.test.mjs"),
    ),
    ("package.json", include_str!("../templates/js/package.json")),
    ("Makefile", include_str!("../templates/js/Makefile")),
    ("README.md", include_str!("../templates/js/README.md")),
    (".gitignore", include_str!("../templates/js/gitignore")),
];

/// The JavaScript SDK, copied as is.
const JS_SDK: &[(&str, &str)] = &[
    ("rehydra.js", include_str!("../../guest-sdk/js/rehydra.js")),
    (
        "printable.js",
        include_str!("../../guest-sdk/js/printable.js"),
    ),
    ("build.mjs", include_str!("../../guest-sdk/js/build.mjs")),
    (
        "test-support/register.mjs",
        include_str!("../../guest-sdk/js/test/register.mjs"),
    ),
    (
        "test-support/log-hooks.mjs",
        include_str!("../../guest-sdk/js/test/log-hooks.mjs"),
    ),
    (
        "test-support/log-stub.mjs",
        include_str!("../../guest-sdk/js/test/log-stub.mjs"),
    ),
];
const JS_SDK_PACKAGE: &str = include_str!("../../guest-sdk/js/package.json");
const JS_SDK_LOCK: &str = include_str!("../../guest-sdk/js/package-lock.json");

const PYTHON_TEMPLATES: &[(&str, &str)] = &[
    ("app.py", include_str!("../templates/python/app.py")),
    (
        "test_app.py",
        include_str!("../templates/python/test_app.py"),
    ),
    ("Makefile", include_str!("../templates/python/Makefile")),
    ("README.md", include_str!("../templates/python/README.md")),
    (".gitignore", include_str!("../templates/python/gitignore")),
];

/// The Python SDK, copied as is.
const PYTHON_SDK: &[(&str, &str)] = &[
    (
        "rehydra.py",
        include_str!("../../guest-sdk/python/rehydra.py"),
    ),
    (
        "rehydra_printable.py",
        include_str!("../../guest-sdk/python/rehydra_printable.py"),
    ),
    (
        "requirements.txt",
        include_str!("../../guest-sdk/python/requirements.txt"),
    ),
];

/// Every file of a new `lang` project named `name`; `sdk` is the Rust SDK
/// directory (Rust only).
pub fn project_files(
    lang: Lang,
    name: &str,
    sdk: Option<&Path>,
) -> anyhow::Result<Vec<ProjectFile>> {
    check_name(name)?;
    let prefix = stream_prefix(name);
    let crate_name = name.replace('-', "_");
    let file = |path: &str, contents: String| ProjectFile {
        path: path.to_owned(),
        contents,
    };
    let mut files = Vec::new();
    match lang {
        Lang::Rust => {
            let sdk = sdk.context("a Rust project needs the path of the Rust SDK")?;
            let sdk = toml_escape(&sdk.display().to_string());
            let toolchain = toolchain_channel()?;
            let vars = [
                ("name", name),
                ("prefix", prefix.as_str()),
                ("crate", crate_name.as_str()),
                ("sdk", sdk.as_str()),
                ("toolchain", toolchain.as_str()),
            ];
            for (path, template) in RUST_TEMPLATES {
                files.push(file(path, render(template, &vars)));
            }
        }
        Lang::Js => {
            let dependencies = js_dependencies()?;
            let rendered = serde_json::to_string_pretty(&dependencies)?.replace('\n', "\n  ");
            let vars = [
                ("name", name),
                ("prefix", prefix.as_str()),
                ("dependencies", rendered.as_str()),
            ];
            for (path, template) in JS_TEMPLATES {
                files.push(file(path, render(template, &vars)));
            }
            for (path, contents) in JS_SDK {
                files.push(file(path, (*contents).to_owned()));
            }
            files.push(file("package-lock.json", js_lock(name, &dependencies)?));
            files.push(file("wit/aggregate.wit", WIT.to_owned()));
        }
        Lang::Python => {
            let vars = [("name", name), ("prefix", prefix.as_str())];
            for (path, template) in PYTHON_TEMPLATES {
                files.push(file(path, render(template, &vars)));
            }
            for (path, contents) in PYTHON_SDK {
                files.push(file(path, (*contents).to_owned()));
            }
            files.push(file("wit/aggregate.wit", WIT.to_owned()));
        }
    }
    Ok(files)
}

/// The toolchain this repository pins (`rust-toolchain.toml`'s channel).
fn toolchain_channel() -> anyhow::Result<String> {
    TOOLCHAIN
        .lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .context("rust-toolchain.toml names no channel (a build problem of rehydra itself)")
}

/// The packages the JS SDK pins (componentize-js and what it needs).
fn js_dependencies() -> anyhow::Result<serde_json::Value> {
    let package: serde_json::Value = serde_json::from_str(JS_SDK_PACKAGE)
        .context("guest-sdk/js/package.json is not JSON (a build problem of rehydra itself)")?;
    let dependencies = package["dependencies"].clone();
    if dependencies["@bytecodealliance/componentize-js"].is_string() {
        Ok(dependencies)
    } else {
        bail!(
            "guest-sdk/js/package.json pins no componentize-js (a build problem of rehydra itself)"
        )
    }
}

/// The SDK's lock file, as the project's: the same pinned packages, under
/// the project's name.
fn js_lock(name: &str, dependencies: &serde_json::Value) -> anyhow::Result<String> {
    let mut lock: serde_json::Value = serde_json::from_str(JS_SDK_LOCK).context(
        "guest-sdk/js/package-lock.json is not JSON (a build problem of rehydra itself)",
    )?;
    lock["name"] = name.into();
    lock["packages"][""] = serde_json::json!({
        "name": name,
        "version": "0.1.0",
        "dependencies": dependencies,
        "engines": { "node": ">=20.6" },
    });
    let mut text = serde_json::to_string_pretty(&lock)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `{{word}}` left in `text`.
    fn placeholder(text: &str) -> Option<&str> {
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let word_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if word_len > 0 && after[word_len..].starts_with("}}") {
                return Some(&after[..word_len]);
            }
            rest = after;
        }
        None
    }

    fn paths(files: &[ProjectFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn names_must_suit_a_type_a_directory_and_a_crate() {
        for good in ["counter", "bank-account", "a_1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1x", "-x", "a.b", "a/b", "..", "é", &"x".repeat(65)] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("cannot name a plugin"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let sdk = Path::new("/sdk");
        for lang in [Lang::Rust, Lang::Js, Lang::Python] {
            let files = project_files(lang, "tally-ho", Some(sdk)).unwrap();
            for f in &files {
                assert_eq!(placeholder(&f.contents), None, "{lang} {}", f.path);
            }
            let all: String = files.iter().map(|f| f.contents.as_str()).collect();
            assert!(
                all.contains("\"tally-ho\"") || all.contains("'tally-ho'"),
                "{lang}"
            );
            assert!(all.contains("tally_ho"), "{lang}: the stream prefix");
        }
    }

    #[test]
    fn each_language_has_its_build_test_and_sdk_files() {
        let rust = project_files(Lang::Rust, "c", Some(Path::new("/sdk"))).unwrap();
        assert_eq!(
            paths(&rust),
            [
                "Cargo.toml",
                "src/lib.rs",
                "rust-toolchain.toml",
                "Makefile",
                "README.md",
                ".gitignore"
            ]
        );
        assert!(
            rust[0]
                .contents
                .contains(r#"rehydra-guest = { path = "/sdk" }"#)
        );
        assert!(rust[2].contents.contains("channel = \"1."));

        let js = project_files(Lang::Js, "c", None).unwrap();
        for needed in [
            "aggregate.js",
            "aggregate.test.mjs",
            "package.json",
            "package-lock.json",
            "rehydra.js",
            "printable.js",
            "build.mjs",
            "test-support/register.mjs",
            "wit/aggregate.wit",
            "Makefile",
        ] {
            assert!(paths(&js).contains(&needed), "js: {needed}");
        }

        let py = project_files(Lang::Python, "c", None).unwrap();
        for needed in [
            "app.py",
            "test_app.py",
            "rehydra.py",
            "rehydra_printable.py",
            "requirements.txt",
            "wit/aggregate.wit",
            "Makefile",
        ] {
            assert!(paths(&py).contains(&needed), "python: {needed}");
        }
    }

    #[test]
    fn the_js_project_pins_what_the_sdk_pins() {
        let sdk: serde_json::Value = serde_json::from_str(JS_SDK_PACKAGE).unwrap();
        let sdk_lock: serde_json::Value = serde_json::from_str(JS_SDK_LOCK).unwrap();
        let js = project_files(Lang::Js, "c", None).unwrap();
        let get = |p: &str| {
            let f = js.iter().find(|f| f.path == p).unwrap();
            serde_json::from_str::<serde_json::Value>(&f.contents).unwrap()
        };
        let package = get("package.json");
        let lock = get("package-lock.json");
        assert_eq!(package["dependencies"], sdk["dependencies"]);
        assert_eq!(package["name"], "c");
        assert_eq!(lock["name"], "c");
        assert_eq!(lock["packages"][""]["dependencies"], sdk["dependencies"]);
        let componentize = "node_modules/@bytecodealliance/componentize-js";
        assert_eq!(
            lock["packages"][componentize],
            sdk_lock["packages"][componentize]
        );
        assert_eq!(
            lock["packages"][componentize]["version"],
            sdk["dependencies"]["@bytecodealliance/componentize-js"]
        );
    }

    #[test]
    fn refuses_a_directory_in_use_and_a_missing_sdk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::write(dir.path().join("c").join("keep"), "mine").unwrap();
        let args = |lang, sdk: Option<&str>| NewArgs {
            lang,
            name: "c".into(),
            dir: dir.path().to_path_buf(),
            sdk: sdk.map(PathBuf::from),
        };
        let err = create(&args(Lang::Python, None)).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        let err = create(&NewArgs {
            name: "d".into(),
            ..args(Lang::Rust, Some("/nowhere"))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--sdk PATH"), "{err}");

        let made = create(&NewArgs {
            name: "e".into(),
            ..args(Lang::Python, None)
        })
        .unwrap();
        assert!(made.join("app.py").is_file());
        assert!(made.join("wit").join("aggregate.wit").is_file());
    }
}
