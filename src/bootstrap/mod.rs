//! `shoal bootstrap`: one description of a new box, rendered as Butane
//! (Flatcar), Ignition JSON (what Butane makes of it) or cloud-init
//! (Debian/Ubuntu). docs/bootstrap.md.
//!
//! [`config`] reads the small bootstrap config (the I/O edge: the config
//! file, the key file, the binary to hash); [`model`] turns it into the
//! files and units a box needs, pure, once for every format; the renderers
//! ([`butane`], [`ignition`], [`cloudinit`]) only lay that model out, so the
//! formats cannot drift apart. The unit and sysctl texts come from
//! `systemd/` (`include_str!`).

pub mod butane;
pub mod cli;
pub mod cloudinit;
pub mod config;
pub mod ignition;
pub mod model;

use std::path::PathBuf;

pub use config::{BootstrapConfig, Inputs};
pub use model::{Contents, FileEntry, Layout, Model, Unit};

/// What can go wrong reading a bootstrap config or building its model.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A field of the bootstrap config is wrong; `field` is its dotted name.
    #[error("field `{field}`: {reason}")]
    Field { field: String, reason: String },
    #[error("render: {0}")]
    Render(String),
}

impl BootstrapError {
    pub(crate) fn field(field: &str, reason: impl Into<String>) -> BootstrapError {
        BootstrapError::Field {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// The three output formats of `shoal bootstrap render --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Butane YAML, variant flatcar (cloud-config/flatcar.bu).
    Butane,
    /// Ignition JSON, spec 3.3.0 (cloud-config/flatcar.ign).
    Ignition,
    /// cloud-init `#cloud-config` for Debian/Ubuntu (cloud-config/shoal.yaml).
    CloudInit,
}

impl Format {
    /// The box layout the format is for.
    pub fn layout(self) -> Layout {
        match self {
            Format::Butane | Format::Ignition => Layout::Flatcar,
            Format::CloudInit => Layout::Debian,
        }
    }
}

/// Renders `inputs` in `format`: the text of the file, as committed.
pub fn render(inputs: &Inputs, format: Format) -> Result<String, BootstrapError> {
    let model = Model::build(inputs, format.layout())?;
    match format {
        Format::Butane => butane::render(&model),
        Format::Ignition => ignition::render(&model),
        Format::CloudInit => cloudinit::render(&model),
    }
}
