//! One poller for the state of every VM of this daemon: a single
//! `/cluster/resources?type=vm` every `status_poll_secs`, shared by all running
//! sandboxes, so watching 500 VMs costs the API what watching one does. It starts with
//! the first watcher and stops when the backend is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::Method;
use super::{Inner, vmid_of};

/// The VMs' states as one listing saw them.
pub struct Listing {
    /// When the request was sent: a listing older than a VM's start says nothing about it.
    pub taken_at: Instant,
    pub states: HashMap<u32, String>,
}

pub type Listings = watch::Receiver<Option<Arc<Listing>>>;

/// Subscribes to the listings, starting the poller on first use.
pub(super) async fn subscribe(inner: &Arc<Inner>) -> Listings {
    inner
        .listings
        .get_or_init(|| async {
            let (tx, rx) = watch::channel(None);
            tokio::spawn(poll(Arc::downgrade(inner), tx));
            rx
        })
        .await
        .clone()
}

async fn poll(inner: Weak<Inner>, tx: watch::Sender<Option<Arc<Listing>>>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let taken_at = Instant::now();
        let op = "watching the sandboxes' VMs";
        match strong.client.call(op, Method::Get, "/cluster/resources", &[("type", "vm".to_owned())]).await {
            Ok(list) => {
                let states = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| {
                        let state = v.get("status").and_then(Value::as_str).unwrap_or("unknown");
                        Some((vmid_of(v)?, state.to_owned()))
                    })
                    .collect();
                let _ = tx.send(Some(Arc::new(Listing { taken_at, states })));
            }
            // The API being unreachable says nothing about the VMs.
            Err(e) => tracing::warn!("{e}"),
        }
        let pause = Duration::from_secs(strong.config.status_poll_secs.max(1));
        drop(strong);
        tokio::time::sleep(pause).await;
    }
}
