//! A broker that unit tests script in place of RabbitMQ: whether it can be
//! reached, and what becomes of each published copy (confirmed, refused,
//! lost with its link, or never answered).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::broker::{Confirm, Confirming, LinkError};
use super::message::QueueMessage;

/// What the publisher's side and the test's side share.
struct Shared {
    /// Whether opening a link succeeds.
    reachable: AtomicBool,
    /// Links opened so far.
    opened: AtomicUsize,
    /// Whether the newest link is up; [`Control::cut`] clears it.
    current: Mutex<Arc<AtomicBool>>,
    /// Every publish, in the order the publisher made them. Unbounded: a
    /// test publishes a handful of copies and reads them all.
    published: mpsc::UnboundedSender<Published>,
}

/// The broker as the publisher sees it.
pub struct Broker(Arc<Shared>);

/// The broker as the test drives it.
pub struct Control {
    /// Shared with [`Broker`].
    shared: Arc<Shared>,
    /// Copies published and not yet taken by the test.
    published: mpsc::UnboundedReceiver<Published>,
}

/// A scripted broker (reachable) and the handle that drives it.
pub fn broker() -> (Broker, Control) {
    let (sender, published) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        reachable: AtomicBool::new(true),
        opened: AtomicUsize::new(0),
        current: Mutex::new(Arc::new(AtomicBool::new(false))),
        published: sender,
    });
    (Broker(shared.clone()), Control { shared, published })
}

impl Broker {
    /// Open a link if the broker is reachable.
    pub fn open(&self) -> Result<Link, String> {
        if !self.0.reachable.load(Ordering::SeqCst) {
            return Err("the scripted broker is unreachable".into());
        }
        let number = self.0.opened.fetch_add(1, Ordering::SeqCst) + 1;
        let up = Arc::new(AtomicBool::new(true));
        *self.0.current.lock().unwrap_or_else(|e| e.into_inner()) = up.clone();
        Ok(Link {
            up,
            number,
            published: self.0.published.clone(),
        })
    }
}

/// One link of the scripted broker.
pub struct Link {
    /// Cleared when the test cuts the link.
    up: Arc<AtomicBool>,
    /// Which link this is (1 for the first opened).
    number: usize,
    /// Where publishes are reported to the test.
    published: mpsc::UnboundedSender<Published>,
}

impl Link {
    /// Whether the test has not cut this link.
    pub fn is_connected(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Report the copy to the test at once (so in publish order) and wait
    /// for the test's answer; a dropped answer is a link lost before the
    /// confirm.
    pub fn publish(&self, message: Arc<QueueMessage>) -> Confirming {
        if !self.is_connected() {
            return Box::pin(std::future::ready(Err(LinkError::new(
                "the scripted link is cut",
            ))));
        }
        let (answer, answered) = oneshot::channel();
        let _ = self.published.send(Published {
            message,
            link: self.number,
            answer,
        });
        Box::pin(async move {
            answered.await.unwrap_or_else(|_| {
                Err(LinkError::new(
                    "the scripted link dropped before the confirm",
                ))
            })
        })
    }
}

/// A copy the publisher published, waiting for the test to answer it.
/// Dropping it unanswered is a link lost before the confirm; keeping it
/// unanswered is a stalled confirm.
pub struct Published {
    /// The copy.
    pub message: Arc<QueueMessage>,
    /// The link it went out on (1 for the first opened).
    pub link: usize,
    /// The publisher's side of the confirm.
    answer: oneshot::Sender<Result<Confirm, LinkError>>,
}

impl Published {
    /// The payload as text, without trailing `.` padding.
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.message.body)
            .trim_end_matches('.')
            .to_owned()
    }

    /// Confirm the copy.
    pub fn ack(self) {
        let _ = self.answer.send(Ok(Confirm::Ack));
    }

    /// Refuse the copy.
    pub fn nack(self) {
        let _ = self.answer.send(Ok(Confirm::Nack));
    }
}

impl Control {
    /// Make opening a link succeed or fail.
    pub fn set_reachable(&self, reachable: bool) {
        self.shared.reachable.store(reachable, Ordering::SeqCst);
    }

    /// Links opened so far.
    pub fn links_opened(&self) -> usize {
        self.shared.opened.load(Ordering::SeqCst)
    }

    /// Take the newest link down: the publisher notices at its next check,
    /// and publishes on it fail.
    pub fn cut(&self) {
        self.shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store(false, Ordering::SeqCst);
    }

    /// The next published copy, waiting for it.
    ///
    /// # Panics
    /// When the publisher is gone.
    pub async fn next(&mut self) -> Published {
        self.published
            .recv()
            .await
            .expect("the publisher is gone without publishing")
    }

    /// The next `count` published copies.
    pub async fn take(&mut self, count: usize) -> Vec<Published> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.next().await);
        }
        out
    }

    /// A published copy not yet taken, if any.
    pub fn try_next(&mut self) -> Option<Published> {
        self.published.try_recv().ok()
    }
}
