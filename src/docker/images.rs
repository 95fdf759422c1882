//! Images in the engine: inspecting one, the chain ids the engine holds,
//! `docker save` (bounded by progress), `docker load` (succeeds only when
//! the engine reports the image loaded), tags and their removal.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{
    ImportImageOptions, ListImagesOptions, RemoveImageOptions, TagImageOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

use super::bounds::{idle_bounded, millis_since, transport_failure};
use super::{api, is_not_found, limits, DockerError, Engine};
use crate::archive::{chain_ids, Digest};

/// An image in the engine, as far as shoal cares.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    pub id: String,
    pub diff_ids: Vec<Digest>,
    pub labels: HashMap<String, String>,
    pub tags: Vec<String>,
    /// The engine's size of the image (its uncompressed layers), bytes.
    pub size: u64,
}
impl Engine {
    /// The image `reference` (tag or id), or `None` when the engine lacks it.
    pub async fn image(&self, reference: &str) -> Result<Option<ImageFacts>, DockerError> {
        match self
            .call(
                "inspect image",
                limits::QUICK,
                self.docker.inspect_image(reference),
            )
            .await?
        {
            Ok(img) => {
                let diff_ids = img
                    .root_fs
                    .and_then(|r| r.layers)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| l.parse().ok())
                    .collect();
                Ok(Some(ImageFacts {
                    id: img.id.unwrap_or_default(),
                    diff_ids,
                    labels: img.config.and_then(|c| c.labels).unwrap_or_default(),
                    tags: img.repo_tags.unwrap_or_default(),
                    size: img.size.map_or(0, |s| s.max(0) as u64),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api("inspect image")(e)),
        }
    }

    /// Every chain id the engine's layer store holds: each image's layer
    /// list and all its prefixes. (The engine API has no call that lists
    /// layers; an image's presence implies its whole chain is present.)
    pub async fn held_chain_ids(&self) -> Result<HashSet<Digest>, DockerError> {
        let images = self
            .call(
                "list images",
                limits::QUICK,
                self.docker.list_images(Some(ListImagesOptions {
                    all: true,
                    ..Default::default()
                })),
            )
            .await?
            .map_err(api("list images"))?;
        let mut held = HashSet::new();
        for summary in images {
            if let Some(img) = self.image(&summary.id).await? {
                held.extend(chain_ids(&img.diff_ids));
            }
        }
        Ok(held)
    }

    /// The `docker save` tar stream of one image, bounded by progress: the
    /// first chunk within [`limits::SAVE_FIRST_BYTE`], each later one within
    /// [`limits::SAVE_IDLE`].
    pub fn export(
        &self,
        reference: &str,
    ) -> impl Stream<Item = Result<Bytes, DockerError>> + Send + 'static {
        let inner = self
            .docker
            .export_image(reference)
            .map_err(|source| DockerError::Api { op: "save", source })
            .boxed();
        idle_bounded("save", inner, limits::SAVE_FIRST_BYTE, limits::SAVE_IDLE)
    }

    /// Sends a `docker load` archive. Succeeds only when the engine reports
    /// the image loaded: a stream error, an `errorDetail`, or an `Error
    /// unpacking image` line (how the containerd store reports a failed
    /// unpack) all fail the load. Returns the engine's messages.
    ///
    /// Bounded by progress: the load fails when for [`limits::LOAD_IDLE`]
    /// the engine takes no byte of the archive and reports no progress (it
    /// does, layer by layer, while it registers what it unpacked), and in
    /// any case after [`limits::LOAD_MAX`].
    pub async fn load<S>(&self, archive: S) -> Result<String, DockerError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let base = tokio::time::Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let touch = {
            let last = last.clone();
            move || last.store(millis_since(base), Ordering::Relaxed)
        };
        let taken = {
            let touch = touch.clone();
            archive.inspect(move |_| touch())
        };
        let work = async {
            let mut out = String::new();
            let mut stream = self.docker.import_image_stream(
                ImportImageOptions {
                    quiet: false,
                    platform: None,
                },
                taken,
                None,
            );
            while let Some(item) = stream.next().await {
                touch();
                let info = match item {
                    Ok(info) => info,
                    Err(e) if transport_failure(&e).is_some() => {
                        return Err(DockerError::Api {
                            op: "load",
                            source: e,
                        })
                    }
                    Err(e) => return Err(DockerError::Load(e.to_string())),
                };
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    return Err(DockerError::Load(e));
                }
                // Progress lines ("Loading layer") only keep the load alive.
                if info.progress_detail.is_some() {
                    continue;
                }
                if let Some(s) = info.stream.or(info.status) {
                    if s.contains("Error unpacking image") {
                        return Err(DockerError::Load(s.trim().to_string()));
                    }
                    out.push_str(&s);
                }
            }
            Ok(out)
        };
        let stalled = async {
            let tick = limits::LOAD_IDLE / 10;
            loop {
                tokio::time::sleep(tick).await;
                let idle = millis_since(base).saturating_sub(last.load(Ordering::Relaxed));
                if Duration::from_millis(idle) >= limits::LOAD_IDLE {
                    return limits::LOAD_IDLE;
                }
            }
        };
        let out = tokio::select! {
            r = work => r?,
            after = stalled => return Err(DockerError::Timeout { op: "load (no progress)", after }),
            _ = tokio::time::sleep(limits::LOAD_MAX) => {
                return Err(DockerError::Timeout { op: "load", after: limits::LOAD_MAX })
            }
        };
        if !out.contains("Loaded image") {
            return Err(DockerError::Load(format!(
                "the engine did not report a loaded image: {}",
                out.trim()
            )));
        }
        Ok(out)
    }

    /// Removes an image tag (and the image when nothing else refers to it).
    /// A missing image is not an error.
    pub async fn remove_image(&self, reference: &str) -> Result<(), DockerError> {
        match self
            .call(
                "remove image",
                limits::CHANGE,
                self.docker.remove_image(
                    reference,
                    Some(RemoveImageOptions {
                        force: true,
                        ..Default::default()
                    }),
                    None,
                ),
            )
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api("remove image")(e)),
        }
    }

    /// Tags image `image` (id or tag) as `repo:tag`.
    pub async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), DockerError> {
        self.call(
            "tag image",
            limits::QUICK,
            self.docker.tag_image(
                image,
                Some(TagImageOptions {
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                }),
            ),
        )
        .await?
        .map_err(api("tag image"))
    }

    /// Every `shoal/...` tag in the engine (the images shoal loaded or
    /// built); other images are never listed, so never touched.
    pub async fn shoal_tags(&self) -> Result<Vec<String>, DockerError> {
        let images = self
            .call(
                "list images",
                limits::QUICK,
                self.docker.list_images(None::<ListImagesOptions>),
            )
            .await?
            .map_err(api("list images"))?;
        let mut tags: Vec<String> = images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.starts_with("shoal/"))
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Removes tag `reference` unless a container uses the image (no
    /// force); `Ok(false)` when it is in use or already gone.
    pub async fn untag(&self, reference: &str) -> Result<bool, DockerError> {
        match self
            .call(
                "untag image",
                limits::CHANGE,
                self.docker
                    .remove_image(reference, None::<RemoveImageOptions>, None),
            )
            .await?
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(false),
            Err(e) => Err(api("remove image")(e)),
        }
    }
}
