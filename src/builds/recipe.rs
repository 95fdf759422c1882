//! A product's recipe: `<recipes>/<product>/Dockerfile` plus an optional
//! `recipe.toml` (every key is documented in `docs/recipes.md`). Parsing
//! and checking are pure ([`parse`]); [`load`] only reads the two files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::ImageRef;
use crate::units::parse_duration;

/// The recipe file name inside a product's recipe directory.
pub const RECIPE_FILE: &str = "recipe.toml";

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("no recipe for product `{product}`: {path} has no Dockerfile")]
    Missing { product: String, path: PathBuf },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe.toml of `{product}`: {message}")]
    Parse { product: String, message: String },
    #[error("recipe.toml of `{product}`, key `{key}`: {message}")]
    Key {
        product: String,
        key: &'static str,
        message: String,
    },
}

/// `recipe.toml` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    base: Option<String>,
    privileged_install: Option<InstallFile>,
    timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallFile {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    capabilities: Option<Vec<String>>,
}

/// A privileged install step: run `command` in a privileged container of
/// the image the Dockerfile built, then commit the container as the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallStep {
    /// The installer and its arguments (exec form, no shell).
    pub command: Vec<String>,
    /// Environment variables for the installer, besides the image's own.
    pub env: BTreeMap<String, String>,
    /// `None`: a fully privileged container (`docker run --privileged`).
    /// Some: only these capabilities are added (`--cap-add`), the least
    /// privilege an installer that knows what it needs can run with.
    pub capabilities: Option<Vec<String>>,
}

/// A checked recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub product: String,
    /// The recipe directory (its files go into the build context).
    pub dir: PathBuf,
    /// The product whose newest published build is `BASE_IMAGE`.
    pub base: Option<String>,
    pub install: Option<InstallStep>,
    /// Overrides the node's `build_timeout`.
    pub timeout: Option<Duration>,
}

/// Checks the text of a `recipe.toml` for `product`.
pub fn parse(product: &str, dir: &Path, text: &str) -> Result<Recipe, RecipeError> {
    let file: RecipeFile = toml::from_str(text).map_err(|e| RecipeError::Parse {
        product: product.to_string(),
        message: e.to_string(),
    })?;
    let key = |key: &'static str, message: String| RecipeError::Key {
        product: product.to_string(),
        key,
        message,
    };
    if let Some(base) = &file.base {
        // A base is a product name: the same rules as an image name.
        ImageRef::new(base, "1").map_err(|e| key("base", e.to_string()))?;
        if base == product {
            return Err(key("base", "a product cannot be its own base".into()));
        }
    }
    let install = match file.privileged_install {
        None => None,
        Some(i) => {
            if i.command.is_empty() || i.command[0].is_empty() {
                return Err(key(
                    "privileged_install.command",
                    "must name the installer".into(),
                ));
            }
            if i.command.iter().any(|a| a.contains('\0')) {
                return Err(key(
                    "privileged_install.command",
                    "contains a NUL byte".into(),
                ));
            }
            for k in i.env.keys() {
                let ok = !k.is_empty()
                    && !k.as_bytes()[0].is_ascii_digit()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(key(
                        "privileged_install.env",
                        format!("`{k}` is not a variable name (A-Z a-z 0-9 _)"),
                    ));
                }
            }
            if let Some(caps) = &i.capabilities {
                if caps.is_empty() {
                    return Err(key(
                        "privileged_install.capabilities",
                        "an empty list: leave the step out, or name what the installer needs"
                            .into(),
                    ));
                }
                for c in caps {
                    let ok = !c.is_empty()
                        && c.len() <= 32
                        && c.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        return Err(key(
                            "privileged_install.capabilities",
                            format!("`{c}` is not a capability name such as SYS_ADMIN"),
                        ));
                    }
                }
            }
            Some(InstallStep {
                command: i.command,
                env: i.env,
                capabilities: i.capabilities,
            })
        }
    };
    let timeout = match &file.timeout {
        None => None,
        Some(t) => {
            let d = parse_duration(t).map_err(|e| key("timeout", e.to_string()))?;
            if d.is_zero() {
                return Err(key("timeout", "must be positive".into()));
            }
            Some(d)
        }
    };
    Ok(Recipe {
        product: product.to_string(),
        dir: dir.to_path_buf(),
        base: file.base,
        install,
        timeout,
    })
}

/// Reads the recipe of `product` under `recipes`.
pub fn load(recipes: &Path, product: &str) -> Result<Recipe, RecipeError> {
    let dir = recipes.join(product);
    if !dir.join("Dockerfile").is_file() {
        return Err(RecipeError::Missing {
            product: product.to_string(),
            path: dir,
        });
    }
    let path = dir.join(RECIPE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(RecipeError::Read { path, source }),
    };
    parse(product, &dir, &text)
}

/// Products that have a recipe (a directory with a `Dockerfile`).
pub fn products(recipes: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(recipes)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("Dockerfile").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Recipe, String> {
        parse("erp-server", Path::new("/r/erp-server"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_recipe_is_a_plain_dockerfile_build() {
        let r = check("").unwrap();
        assert_eq!(
            (r.base, r.install, r.timeout),
            (None, None, None),
            "no keys, no extras"
        );
    }

    #[test]
    fn full_recipe() {
        let r = check(
            r#"
base = "erp-db"
timeout = "30m"
[privileged_install]
command = ["/install.sh", "--silent"]
env = { INSTALL_DIR = "/opt/erp" }
"#,
        )
        .unwrap();
        assert_eq!(r.base.as_deref(), Some("erp-db"));
        assert_eq!(r.timeout, Some(Duration::from_secs(1800)));
        let i = r.install.unwrap();
        assert_eq!(i.command, ["/install.sh", "--silent"]);
        assert_eq!(i.env["INSTALL_DIR"], "/opt/erp");
        assert_eq!(i.capabilities, None, "fully privileged by default");
        let r = check("[privileged_install]\ncommand = [\"x\"]\ncapabilities = [\"SYS_ADMIN\"]")
            .unwrap();
        assert_eq!(r.install.unwrap().capabilities.unwrap(), ["SYS_ADMIN"]);
    }

    #[test]
    fn bad_recipes_name_the_key() {
        let cases = [
            ("colour = \"blue\"", "unknown field"),
            ("base = \"ERP\"", "`base`"),
            ("base = \"../db\"", "`base`"),
            ("base = \"erp-server\"", "own base"),
            ("timeout = \"soon\"", "`timeout`"),
            ("timeout = \"0s\"", "`timeout`"),
            (
                "[privileged_install]\ncommand = []",
                "privileged_install.command",
            ),
            (
                "[privileged_install]\ncommand = [\"\"]",
                "privileged_install.command",
            ),
            (
                "[privileged_install]\ncommand = [\"x\"]\nenv = { \"A B\" = \"1\" }",
                "privileged_install.env",
            ),
            ("[privileged_install]\ncmd = [\"x\"]", "unknown field"),
            ("[privileged_install]\n", "missing field `command`"),
            (
                "[privileged_install]\ncommand = [\"x\"]\ncapabilities = []",
                "privileged_install.capabilities",
            ),
            (
                "[privileged_install]\ncommand = [\"x\"]\ncapabilities = [\"sys admin\"]",
                "privileged_install.capabilities",
            ),
        ];
        for (text, want) in cases {
            let err = check(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn load_needs_a_dockerfile() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("app");
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(
            load(dir.path(), "app"),
            Err(RecipeError::Missing { .. })
        ));
        std::fs::write(p.join("Dockerfile"), "FROM scratch\n").unwrap();
        assert_eq!(load(dir.path(), "app").unwrap().base, None);
        std::fs::write(p.join(RECIPE_FILE), "base = \"db\"\n").unwrap();
        assert_eq!(load(dir.path(), "app").unwrap().base.as_deref(), Some("db"));
        assert_eq!(products(dir.path()), ["app"]);
    }
}
