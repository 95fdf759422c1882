//! `shoal bootstrap render`: the CLI glue (main.rs only dispatches here).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{render, BootstrapError, Format, Inputs};

#[derive(Debug, Subcommand)]
pub enum BootstrapCmd {
    /// Render a bootstrap config (cloud-config/bootstrap.example.toml) as
    /// Butane, Ignition or cloud-init.
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[arg(long, value_enum)]
    pub format: Format,
    /// Write here instead of stdout (mode 0600 when the output carries the
    /// cluster key inline).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The bootstrap config (TOML).
    pub config: PathBuf,
}

pub fn run(cmd: &BootstrapCmd) -> Result<(), BootstrapError> {
    match cmd {
        BootstrapCmd::Render(a) => {
            let inputs = Inputs::load(&a.config)?;
            let text = render(&inputs, a.format)?;
            match &a.output {
                None => {
                    print!("{text}");
                    Ok(())
                }
                Some(p) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let secret = matches!(inputs.key, super::config::KeyContents::Inline(_));
                    let err = |source| BootstrapError::Write {
                        path: p.clone(),
                        source,
                    };
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(if secret { 0o600 } else { 0o644 })
                        .open(p)
                        .map_err(err)?;
                    f.write_all(text.as_bytes()).map_err(err)
                }
            }
        }
    }
}
