//! The Kubernetes backend of [`Store`]: each object is a Secret (`<namespace>/<name>`), its data
//! keys the Secret's data, its labels and annotations the Secret's.
//!
//! # Compare-and-swap
//!
//! The Secret's `metadata.resourceVersion` is the store's [`ResourceVersion`]. A write is a single
//! API call, so every data key, label and annotation changes in one atomic update:
//!
//! - **update** (`Version`, and `Any` on an existing object): a `PUT` carrying the version read;
//!   the API server refuses it with 409 when anyone wrote in between. The object read is modified
//!   in place, so metadata meshca does not own (owner references, finalizers, the type) survives.
//! - **create** (`Absent`, and `Any` on a missing object): a server-side apply `PATCH` to the
//!   object's own URL, carrying a resource version no object can have (`u64::MAX`). On a missing
//!   object the API server creates it (an apply may create, and ignores the version then); on an
//!   existing one the version does not match and it answers 409 — so the create happens only if
//!   the object is absent, exactly like `POST`.
//!
//!   Why not `POST`: RBAC cannot restrict a `POST` by name (the name is in the body, not the URL),
//!   so an agent allowed to create `cacerts` by `POST` could create *any* Secret in `istio-system`.
//!   An apply names the object in its URL, and the API server authorizes the implied create with
//!   that name, so a Role with `resourceNames: [cacerts]` is enough — and denies everything else.
//!   (Checked against a real API server by `tests/kube_store.rs`.)
//!
//! # Watch
//!
//! kube-rs' watcher with `fieldSelector=metadata.name=<name>` (which RBAC also authorizes by
//! name): a list, then the API server's watch from the listed version; when that version has
//! expired (410 Gone) or the connection drops, it lists again. The store's watch yields the
//! current state first and then each change, deduplicated by resource version.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as KSecret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use meshca_store::{
    ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Versioned, WatchStream, is_valid_data_key,
};

use crate::{FIELD_MANAGER, api_status};

/// A resource version no object has: etcd revisions count up from 1 and never get near it. Used
/// as the precondition of a create-by-apply (see the module documentation).
const NEVER_A_VERSION: &str = "18446744073709551615";

/// How many times an unconditional write re-reads after losing a race before it gives up.
const ANY_ATTEMPTS: usize = 8;

/// [`Store`] on Kubernetes Secrets. Cheap to clone (a [`Client`] is a handle).
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store on the API server `client` talks to.
    pub fn new(client: Client) -> Self {
        KubeStore { client }
    }

    fn api(&self, namespace: &str) -> Api<KSecret> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// Maps a failed call on `key` to the store's error. `pre` decides what a 409 means.
fn map_err(key: &ObjectKey, e: kube::Error) -> StoreError {
    match api_status(&e) {
        Some((403, message)) | Some((401, message)) => StoreError::Forbidden { key: key.to_string(), reason: message },
        Some((404, _)) => StoreError::NotFound(key.clone()),
        Some((422, message)) => StoreError::InvalidKey(format!("{key}: the API server refused it: {message}")),
        Some((code, message)) => StoreError::Backend(format!("{key}: API server answered {code}: {message}")),
        None => StoreError::Backend(format!("{key}: {e}")),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(api_status(e), Some((409, _)))
}

fn version_of(s: &KSecret) -> ResourceVersion {
    ResourceVersion(s.metadata.resource_version.clone().unwrap_or_default())
}

fn from_kube(s: &KSecret) -> Versioned<Secret> {
    let mut out = Secret::with_data(s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
    out.labels = s.metadata.labels.clone().unwrap_or_default();
    out.annotations = s.metadata.annotations.clone().unwrap_or_default();
    Versioned { value: out, version: version_of(s) }
}

fn data_of(secret: &Secret) -> BTreeMap<String, ByteString> {
    secret.data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone()))).collect()
}

fn non_empty(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then(|| m.clone())
}

/// The Secret a create applies: type `Opaque`, the data, labels and annotations.
fn new_object(key: &ObjectKey, secret: &Secret) -> KSecret {
    KSecret {
        metadata: ObjectMeta {
            name: Some(key.name().to_string()),
            namespace: Some(key.namespace().to_string()),
            labels: non_empty(&secret.labels),
            annotations: non_empty(&secret.annotations),
            resource_version: Some(NEVER_A_VERSION.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data_of(secret)),
        ..Default::default()
    }
}

fn check_keys(key: &ObjectKey, secret: &Secret) -> Result<(), StoreError> {
    match secret.data.keys().find(|k| !is_valid_data_key(k)) {
        Some(bad) => Err(StoreError::InvalidKey(format!(
            "data key {bad:?} of {key}: data keys are [-._a-zA-Z0-9]+, at most 253 characters, not `.` and not starting with `..`"
        ))),
        None => Ok(()),
    }
}

impl KubeStore {
    /// Creates `key` if it does not exist. `Ok(None)`: it exists.
    async fn create(&self, key: &ObjectKey, secret: &Secret) -> Result<Option<ResourceVersion>, StoreError> {
        let api = self.api(key.namespace());
        // `force`: the object is new, so there is no other manager's field to take over; an
        // apply without it would be refused only for such conflicts.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch(key.name(), &params, &Patch::Apply(&new_object(key, secret))).await {
            Ok(created) => Ok(Some(version_of(&created))),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(map_err(key, e)),
        }
    }

    /// Replaces the data, labels and annotations of `current`, if it is still at its version.
    /// `Ok(None)`: someone wrote first.
    async fn update(
        &self,
        key: &ObjectKey,
        mut current: KSecret,
        secret: &Secret,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        current.data = Some(data_of(secret));
        current.string_data = None;
        current.metadata.labels = non_empty(&secret.labels);
        current.metadata.annotations = non_empty(&secret.annotations);
        // managedFields are the API server's bookkeeping; sending them back stale would be refused
        // or misattribute ownership.
        current.metadata.managed_fields = None;
        match self
            .api(key.namespace())
            .replace(
                key.name(),
                &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                &current,
            )
            .await
        {
            Ok(updated) => Ok(Some(version_of(&updated))),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(map_err(key, e)),
        }
    }

    async fn current(&self, key: &ObjectKey) -> Result<Option<KSecret>, StoreError> {
        self.api(key.namespace()).get_opt(key.name()).await.map_err(|e| map_err(key, e))
    }
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn get(&self, key: &ObjectKey) -> Result<Option<Versioned<Secret>>, StoreError> {
        Ok(self.current(key).await?.as_ref().map(from_kube))
    }

    async fn put(
        &self,
        key: &ObjectKey,
        secret: &Secret,
        precondition: Precondition,
    ) -> Result<ResourceVersion, StoreError> {
        check_keys(key, secret)?;
        match precondition {
            Precondition::Absent => {
                self.create(key, secret).await?.ok_or_else(|| StoreError::AlreadyExists(key.clone()))
            }
            Precondition::Version(expected) => {
                let current = self.current(key).await?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
                let found = version_of(&current);
                if found != expected {
                    return Err(StoreError::Conflict { key: key.clone(), expected: expected.0, found: found.0 });
                }
                match self.update(key, current, secret).await? {
                    Some(v) => Ok(v),
                    None => {
                        let found =
                            self.current(key).await?.map(|c| version_of(&c).0).unwrap_or_else(|| "deleted".into());
                        Err(StoreError::Conflict { key: key.clone(), expected: expected.0, found })
                    }
                }
            }
            Precondition::Any => {
                // Last writer wins, but still through compare-and-swap: each attempt writes over
                // the version it read, so a concurrent create or update is retried, not clobbered
                // half-way.
                for _ in 0..ANY_ATTEMPTS {
                    let done = match self.current(key).await? {
                        None => self.create(key, secret).await?,
                        Some(current) => self.update(key, current, secret).await?,
                    };
                    if let Some(v) = done {
                        return Ok(v);
                    }
                }
                Err(StoreError::Backend(format!(
                    "{key}: too many concurrent writers; gave up after {ANY_ATTEMPTS} attempts"
                )))
            }
        }
    }

    async fn delete(&self, key: &ObjectKey, precondition: Precondition) -> Result<(), StoreError> {
        let api = self.api(key.namespace());
        let params = match precondition {
            Precondition::Absent => {
                return match self.current(key).await? {
                    Some(_) => Err(StoreError::AlreadyExists(key.clone())),
                    None => Ok(()),
                };
            }
            Precondition::Any => DeleteParams::default(),
            Precondition::Version(ref v) => DeleteParams {
                preconditions: Some(Preconditions { resource_version: Some(v.0.clone()), uid: None }),
                ..Default::default()
            },
        };
        match api.delete(key.name(), &params).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => {
                let found = self.current(key).await?.map(|c| version_of(&c).0).unwrap_or_else(|| "deleted".into());
                let expected = match precondition {
                    Precondition::Version(v) => v.0,
                    _ => String::new(),
                };
                Err(StoreError::Conflict { key: key.clone(), expected, found })
            }
            Err(e) => Err(map_err(key, e)),
        }
    }

    async fn list(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        // Validate the namespace the way keys are validated (a probe key with a fixed name).
        let probe = ObjectKey::new(namespace, "x")?;
        // Metadata only: listing must not pull every secret's data over the wire.
        let list = self.api(namespace).list_metadata(&ListParams::default()).await.map_err(|e| map_err(&probe, e))?;
        let mut names: Vec<String> = list.items.into_iter().filter_map(|o| o.metadata.name).collect();
        names.sort();
        Ok(names)
    }

    fn watch(&self, key: &ObjectKey) -> WatchStream {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", key.name()));
        // Backoff between the watcher's retries (list/watch again) while the API server is away.
        let events = watcher::watcher(self.api(key.namespace()), config).default_backoff().boxed();
        let state = WatchState { events, key: key.clone(), last: None, failing: false, listing: None };
        futures::stream::unfold(state, WatchState::next_item).boxed()
    }
}

struct WatchState {
    events: futures::stream::BoxStream<'static, Result<watcher::Event<KSecret>, watcher::Error>>,
    key: ObjectKey,
    /// The version last yielded (`Some(None)`: absent); `None` before the first item.
    last: Option<Option<String>>,
    /// The last item was an error: say it once, not at every retry of the watcher's backoff.
    failing: bool,
    /// During a (re-)list: what it found so far.
    listing: Option<Option<KSecret>>,
}

type WatchItem = Result<Option<Versioned<Secret>>, StoreError>;

impl WatchState {
    async fn next_item(mut self) -> Option<(WatchItem, WatchState)> {
        loop {
            let event = match self.events.next().await? {
                Ok(e) => e,
                Err(e) => {
                    // The watcher retries by itself (with backoff: watch again from the last
                    // version, or list again when the API server answers 410 Gone); report the
                    // outage once, and forget what we yielded so that a re-list yields the
                    // current state even if unchanged.
                    self.last = None;
                    if self.failing {
                        continue;
                    }
                    self.failing = true;
                    return Some((Err(watch_err(&self.key, e)), self));
                }
            };
            let now: Option<KSecret> = match event {
                watcher::Event::Init => {
                    self.listing = Some(None);
                    continue;
                }
                watcher::Event::InitApply(s) => {
                    self.listing = Some(Some(s));
                    continue;
                }
                watcher::Event::InitDone => self.listing.take().flatten(),
                watcher::Event::Apply(s) => Some(s),
                watcher::Event::Delete(_) => None,
            };
            self.failing = false;
            let version = now.as_ref().map(|s| version_of(s).0);
            if self.last.as_ref() == Some(&version) {
                continue;
            }
            self.last = Some(version);
            return Some((Ok(now.as_ref().map(from_kube)), self));
        }
    }
}

fn watch_err(key: &ObjectKey, e: watcher::Error) -> StoreError {
    let text = e.to_string();
    match &e {
        watcher::Error::InitialListFailed(k) | watcher::Error::WatchStartFailed(k) | watcher::Error::WatchFailed(k) => {
            match api_status(k) {
                Some((403, m)) | Some((401, m)) => StoreError::Forbidden { key: key.to_string(), reason: m },
                _ => StoreError::Backend(format!("watching {key}: {text}")),
            }
        }
        _ => StoreError::Backend(format!("watching {key}: {text}")),
    }
}
