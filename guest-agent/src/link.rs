//! The agent's channel once the job runs, kept through the host going away.
//!
//! While the link is down the job runs on: its output queues here (up to
//! [`MAX_BUFFERED`] bytes; beyond that it is dropped, and a marker says how much) and a
//! background task re-dials. The host that answers sends `ResumeJob` with the last
//! chunk it has stored; every chunk after it is sent again, renumbered from there, so
//! nothing is lost and nothing is stored twice. Chunks are forgotten only once the host
//! acknowledges them, that is, once they are stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentlab_protocol::{
    CHUNK_WINDOW, DataMessage, GuestConnection, GuestMessage, HostMessage, MessageKind, OutputChunk, OutputStream,
    SEND_CHUNK_LEN,
};
use tokio::task::JoinHandle;

use crate::error::AgentError;
use crate::output::ChunkPool;
use crate::session::{BoxStream, Dialer};

/// Most output bytes held while the host is away (or slow); more is dropped.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;
/// How long the agent keeps re-dialing before it gives the job up.
const RESUME_WINDOW: Duration = Duration::from_secs(600);
const REDIAL_PAUSE: Duration = Duration::from_millis(200);

/// What the link has for the caller. Short-lived, one at a time: its size is no concern.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Message(HostMessage),
    /// The host came back; queued output goes out again from where it had stored.
    Resumed,
}

type Reconnect = JoinHandle<Result<(GuestConnection<BoxStream>, Option<u64>), AgentError>>;

pub struct Link {
    conn: Option<GuestConnection<BoxStream>>,
    dialer: Arc<Dialer>,
    job_id: String,
    reconnect: Option<Reconnect>,
    /// Not sent yet.
    pending: VecDeque<(OutputStream, Vec<u8>)>,
    /// Sent, not acknowledged.
    unacked: VecDeque<OutputChunk>,
    next_seq: u64,
    buffered: usize,
    /// Bytes dropped since the last marker.
    dropped: u64,
    /// The host can take a job back (`Capabilities::RESUME`); if not, a lost link is
    /// the end.
    resumable: bool,
    lost: Option<String>,
    /// Where acknowledged chunks' buffers go, for the output readers to fill again.
    pool: ChunkPool,
}

impl Link {
    pub fn new(conn: GuestConnection<BoxStream>, dialer: Arc<Dialer>, job_id: &str, resumable: bool) -> Link {
        Link {
            conn: Some(conn),
            dialer,
            job_id: job_id.to_owned(),
            reconnect: None,
            pending: VecDeque::new(),
            unacked: VecDeque::new(),
            next_seq: 0,
            buffered: 0,
            dropped: 0,
            resumable,
            lost: None,
            pool: ChunkPool::default(),
        }
    }

    /// The pool the link returns stored chunks' buffers to.
    pub fn pool(&self) -> ChunkPool {
        self.pool.clone()
    }

    pub fn is_up(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether the job's output may be read on: more can be sent now, or the link is
    /// down (then output queues, or is dropped, but the job is never blocked).
    pub fn wants_output(&self) -> bool {
        !self.is_up() || (self.pending.is_empty() && (self.unacked.len() as u64) < CHUNK_WINDOW)
    }

    /// Nothing is waiting to be sent.
    pub fn sent_everything(&self) -> bool {
        self.pending.is_empty()
    }

    /// Queues output, cut to chunk size; past [`MAX_BUFFERED`] it is counted and dropped.
    pub fn queue(&mut self, stream: OutputStream, data: Vec<u8>) {
        if data.len() <= SEND_CHUNK_LEN {
            // The common case: the buffer moves on as it is.
            self.queue_piece(stream, data);
            return;
        }
        for piece in data.chunks(SEND_CHUNK_LEN) {
            self.queue_piece(stream, piece.to_vec());
        }
    }

    fn queue_piece(&mut self, stream: OutputStream, piece: Vec<u8>) {
        if self.buffered + piece.len() > MAX_BUFFERED {
            self.dropped += piece.len() as u64;
            self.pool.give(piece);
            return;
        }
        self.buffered += piece.len();
        self.pending.push_back((stream, piece));
    }

    /// Sends queued output while the window allows.
    pub async fn pump(&mut self) {
        while (self.unacked.len() as u64) < CHUNK_WINDOW {
            let Some(conn) = self.conn.as_mut() else { return };
            let Some((stream, data)) = self.pending.pop_front() else { return };
            // The data goes out from its own buffer and stays there for a resend.
            match conn.send_data_frame(DataMessage::Output { seq: self.next_seq, stream }, &data).await {
                Ok(()) => {
                    self.unacked.push_back(OutputChunk { seq: self.next_seq, stream, data });
                    self.next_seq += 1;
                }
                Err(e) => {
                    // Not sent: back where it was.
                    self.pending.push_front((stream, data));
                    self.lose(&e.to_string());
                }
            }
        }
    }

    /// Sends one message; a failure takes the link down (the caller sends it again
    /// after [`Event::Resumed`]).
    pub async fn send(&mut self, msg: GuestMessage) -> bool {
        let Some(conn) = self.conn.as_mut() else { return false };
        match conn.send(msg).await {
            Ok(()) => true,
            Err(e) => {
                self.lose(&e.to_string());
                false
            }
        }
    }

    /// The connection, while the link is up (for the artifact push).
    pub fn conn(&mut self) -> Option<&mut GuestConnection<BoxStream>> {
        self.conn.as_mut()
    }

    pub fn ack(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|c| c.seq <= seq) {
            if let Some(chunk) = self.unacked.pop_front() {
                self.buffered -= chunk.data.len();
                self.pool.give(chunk.data);
            }
        }
    }

    /// Takes the link down and starts re-dialing.
    pub fn lose(&mut self, why: &str) {
        if self.conn.take().is_some() {
            tracing::warn!("lost the host ({why}); the job runs on while the agent re-dials");
        }
        if !self.resumable {
            self.lost.get_or_insert_with(|| why.to_owned());
            return;
        }
        if self.reconnect.is_none() {
            let (dialer, job_id) = (self.dialer.clone(), self.job_id.clone());
            self.reconnect = Some(tokio::spawn(redial(dialer, job_id)));
        }
    }

    /// The next message from the host; while the link is down, waits for it to come
    /// back. Cancel-safe.
    pub async fn next(&mut self) -> Result<Event, AgentError> {
        loop {
            if let Some(conn) = self.conn.as_mut() {
                match conn.recv().await {
                    Ok(Some(msg)) => return Ok(Event::Message(msg)),
                    Ok(None) => self.lose("the host closed the channel"),
                    Err(e) => self.lose(&e.to_string()),
                }
                continue;
            }
            if let Some(why) = &self.lost {
                return Err(AgentError::Gone(format!("the host went away ({why}) and cannot resume a job")));
            }
            let Some(task) = self.reconnect.as_mut() else {
                self.lose("no channel");
                continue;
            };
            let joined = task.await;
            self.reconnect = None;
            let (conn, stored_through) = joined.map_err(|e| AgentError::Gone(e.to_string()))??;
            self.resume(conn, stored_through);
            return Ok(Event::Resumed);
        }
    }

    /// The host has stored output through `stored_through`: everything after it is
    /// queued again, renumbered from there.
    fn resume(&mut self, conn: GuestConnection<BoxStream>, stored_through: Option<u64>) {
        let next = stored_through.map_or(0, |s| s + 1);
        // Stored ones are done with (their buffers are reused); the rest go again, first.
        let (stored, unsent): (Vec<OutputChunk>, Vec<OutputChunk>) = self.unacked.drain(..).partition(|c| c.seq < next);
        for chunk in stored {
            self.pool.give(chunk.data);
        }
        for chunk in unsent.into_iter().rev() {
            self.pending.push_front((chunk.stream, chunk.data));
        }
        self.buffered = self.pending.iter().map(|(_, d)| d.len()).sum();
        if self.dropped > 0 {
            let marker =
                format!("\n[agentlab: {} bytes of output were dropped while the host was unreachable]\n", self.dropped);
            self.dropped = 0;
            self.buffered += marker.len();
            self.pending.push_back((OutputStream::Stderr, marker.into_bytes()));
        }
        self.next_seq = next;
        self.conn = Some(conn);
        tracing::info!("the host is back; resending from output chunk {next}");
    }
}

/// Re-dials until a host takes the job back, or [`RESUME_WINDOW`] has passed.
async fn redial(dialer: Arc<Dialer>, job_id: String) -> Result<(GuestConnection<BoxStream>, Option<u64>), AgentError> {
    let deadline = Instant::now() + RESUME_WINDOW;
    let mut last = String::new();
    while Instant::now() < deadline {
        match dialer.dial_once().await {
            Ok(mut conn) => match conn.recv().await {
                Ok(Some(HostMessage::ResumeJob { job_id: resumed, stored_through })) if resumed == job_id => {
                    return Ok((conn, stored_through));
                }
                Ok(Some(other)) => last = format!("the host sent {} instead of resuming {job_id}", other.kind()),
                Ok(None) => last = "the host hung up".to_owned(),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(REDIAL_PAUSE).await;
    }
    Err(AgentError::Gone(format!("no host took job {job_id} back within {} s: {last}", RESUME_WINDOW.as_secs())))
}
