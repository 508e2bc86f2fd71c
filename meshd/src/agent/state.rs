//! State owned by concern: each piece of the agent's state (the node table, local endpoints,
//! identities, the policy sources, the compiled policy, encryption, routes, the datapath) has
//! exactly one writer, the task that reconciles it, and any number of readers that take cheap
//! snapshots (`Arc` clones) or wait for the next change. No lock is held across a syscall, a
//! compilation or an await: a snapshot is taken, the lock is gone.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// The one writer of a piece of state; deliberately not `Clone`.
pub struct Writer<T>(watch::Sender<Arc<T>>);

/// A reader: snapshots now, or a wake-up on the next change.
pub struct Reader<T>(watch::Receiver<Arc<T>>);

impl<T> Clone for Reader<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// A new piece of state with its writer and a first reader.
pub fn channel<T>(initial: T) -> (Writer<T>, Reader<T>) {
    let (tx, rx) = watch::channel(Arc::new(initial));
    (Writer(tx), Reader(rx))
}

impl<T> Writer<T> {
    /// Replaces the state; readers see the new value on their next snapshot.
    pub fn set(&self, value: T) {
        self.0.send_replace(Arc::new(value));
    }

    /// What was last written.
    pub fn current(&self) -> Arc<T> {
        self.0.borrow().clone()
    }

    /// Changes the state in place (copy on write); readers are woken only when `f` says it
    /// changed something.
    pub fn update(&self, f: impl FnOnce(&mut T) -> bool)
    where
        T: Clone,
    {
        self.0.send_if_modified(|v| f(Arc::make_mut(v)));
    }

    pub fn reader(&self) -> Reader<T> {
        Reader(self.0.subscribe())
    }
}

/// The writer of a piece of state is gone: its task ended.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a source of this reconciler stopped")]
pub struct SourceGone;

impl<T> Reader<T> {
    /// The current value (marks it seen).
    pub fn get(&mut self) -> Arc<T> {
        self.0.borrow_and_update().clone()
    }

    /// The current value, without marking it seen.
    pub fn peek(&self) -> Arc<T> {
        self.0.borrow().clone()
    }

    /// Waits until the value changes after the last `get`.
    pub async fn changed(&mut self) -> Result<(), SourceGone> {
        self.0.changed().await.map_err(|_| SourceGone)
    }
}

/// Something a reconciler waits on.
pub trait Watched: Send {
    fn wait(&mut self) -> BoxFuture<'_, Result<(), SourceGone>>;
}

impl<T: Send + Sync> Watched for Reader<T> {
    fn wait(&mut self) -> BoxFuture<'_, Result<(), SourceGone>> {
        Box::pin(self.changed())
    }
}

/// After a change, how long a reconciler waits for more before its pass: a storm of changes
/// (thousands of nodes joining) costs a pass per window, not a pass per change, and one change
/// still reaches the kernel within tens of milliseconds.
pub const COALESCE: Duration = Duration::from_millis(25);

/// Waits until any of `sources` changes (true, after [`COALESCE`] so that changes arriving
/// together are taken together) or `timeout` passes (false: the level-triggered timer). An
/// error means a source's writer ended, which ends the agent.
pub async fn any_change(
    sources: &mut [&mut dyn Watched],
    timeout: Duration,
) -> Result<bool, SourceGone> {
    let waits: Vec<_> = sources.iter_mut().map(|s| s.wait()).collect();
    let changed = tokio::select! {
        (r, _, _) = futures::future::select_all(waits) => r.map(|()| true),
        _ = tokio::time::sleep(timeout) => Ok(false),
    }?;
    if changed {
        tokio::time::sleep(COALESCE).await;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_see_the_latest_value_and_wake_on_change() {
        let (w, mut r) = channel(1u32);
        assert_eq!(*r.get(), 1);
        w.set(2);
        assert!(
            any_change(&mut [&mut r], Duration::from_secs(5))
                .await
                .unwrap()
        );
        assert_eq!(*r.get(), 2);
        // An update that changes nothing wakes nobody.
        w.update(|_| false);
        assert!(
            !any_change(&mut [&mut r], Duration::from_millis(50))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn a_gone_writer_is_reported() {
        let (w, mut r) = channel(());
        drop(w);
        assert!(
            any_change(&mut [&mut r], Duration::from_secs(5))
                .await
                .is_err()
        );
    }
}
