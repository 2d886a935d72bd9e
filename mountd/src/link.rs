//! A server's end of its supervisor's socket: sending what a successor
//! needs (acknowledged, or the change it belongs to is not made), and
//! receiving it as a successor. The messages are protocol.rs's.

use crate::protocol::InitRecord;
use crate::protocol::{self, Manifest, Message, ProtocolError, Tag};
use crate::served::{Checkpoint, Served};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// How long a checkpoint waits for the supervisor's answer. The
/// supervisor answers from memory in microseconds; this is for a
/// supervisor that stopped answering altogether.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The supervisor's answer to a checkpoint, routed here by whoever reads
/// the socket (`daemon::hear_supervisor`).
#[derive(Debug)]
pub enum Answer {
    Ack(u64),
    Nak(u64, String),
    /// The supervisor is gone: this server serves alone from now on, and
    /// its checkpoints go nowhere.
    Gone,
}

struct Sent {
    /// The last acknowledged checkpoint's number.
    seq: u64,
    /// The highest number sent, acknowledged or not: each checkpoint takes
    /// the next, so that an answer that comes late (to one that timed out)
    /// can never pass for the answer to another.
    highest: u64,
    /// The generations whose files the supervisor holds: those of the
    /// last acknowledged checkpoint, no others. Emptied when an answer
    /// never came (the supervisor may hold either set): the next
    /// checkpoint then sends every generation's files again.
    generations: HashSet<u32>,
    alone: bool,
}

pub struct Link {
    sock: OwnedFd,
    sent: Mutex<Sent>,
    answers: Mutex<Receiver<Answer>>,
    answer: Sender<Answer>,
    /// Whether a reader thread routes answers here (else `wait_for` reads).
    routed: std::sync::atomic::AtomicBool,
    /// Held by a re-pin while it works; re-pins are skipped while
    /// `frozen`: during a restart the old and the new server must serve
    /// the same generations until one of them serves alone.
    repin: Mutex<()>,
    frozen: std::sync::atomic::AtomicBool,
    /// Told it serves alone (`Sole`): a server beside another waits for it.
    pub sole: std::sync::atomic::AtomicBool,
    /// Counts thaws: a freeze that waited for a re-pin under way and finds
    /// a thaw came meanwhile (its step was given up) does not freeze.
    thaws: std::sync::atomic::AtomicU64,
}

impl Link {
    /// A link with nothing sent yet. Until `answers` is called, the
    /// supervisor's answers are read from the socket by whoever waits.
    pub fn new(sock: OwnedFd) -> Link {
        let (answer, answers) = mpsc::channel();
        Link {
            sock,
            sent: Mutex::new(Sent {
                seq: 0,
                highest: 0,
                generations: HashSet::new(),
                alone: false,
            }),
            answers: Mutex::new(answers),
            answer,
            routed: std::sync::atomic::AtomicBool::new(false),
            repin: Mutex::new(()),
            frozen: std::sync::atomic::AtomicBool::new(false),
            thaws: std::sync::atomic::AtomicU64::new(0),
            sole: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Held for a whole re-pin; `None` while re-pins are frozen.
    pub fn repin(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        let guard = self.repin.lock().unwrap_or_else(|e| e.into_inner());
        (!self.frozen.load(std::sync::atomic::Ordering::SeqCst)).then_some(guard)
    }

    /// What a freeze asked for now must find unchanged once it holds the
    /// re-pin lock: taken when the supervisor's Freeze arrives.
    pub fn freeze_ticket(&self) -> u64 {
        self.thaws.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops re-pins; a re-pin under way ends first. Until the guard is
    /// dropped none can start even if thawed. `None` if a thaw came since
    /// `ticket` was taken: the supervisor gave the step up while a re-pin
    /// held the lock, and nothing is to stay frozen.
    pub fn freeze(&self, ticket: u64) -> Option<std::sync::MutexGuard<'_, ()>> {
        let guard = self.repin.lock().unwrap_or_else(|e| e.into_inner());
        if self.thaws.load(std::sync::atomic::Ordering::SeqCst) != ticket {
            return None;
        }
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        Some(guard)
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn thaw(&self) {
        self.thaws.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A successor goes on from the checkpoint it restored: the
    /// supervisor holds those generations.
    pub fn continue_from(&self, seq: u64, generations: HashSet<u32>) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.seq = seq;
        sent.highest = seq;
        sent.generations = generations;
    }

    /// The highest number any server of this mount sent (the supervisor
    /// says, with `Go`): this one's next checkpoint is numbered above it.
    pub fn number_above(&self, highest: u64) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.highest = sent.highest.max(highest);
    }

    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Where the socket's reader puts the supervisor's answers; from
    /// now on it alone reads the socket.
    pub fn answers(&self) -> Sender<Answer> {
        self.routed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.answer.clone()
    }

    pub fn send(&self, tag: Tag, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
        protocol::send(&self.sock, tag, body, fds)
    }

    pub fn seq(&self) -> u64 {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).seq
    }

    /// Hands the supervisor what a successor needs to answer for every
    /// inode the kernel may hold, and waits until it says it has all of
    /// it. One at a time. Without a supervisor (it is gone), Ok.
    pub fn checkpoint(&self, served: &Served) -> Result<(), ProtocolError> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.alone {
            return Ok(());
        }
        let snapshot = served
            .checkpoint(&|n| sent.generations.contains(&n))
            .map_err(|e| ProtocolError(format!("taking a checkpoint: {e}")))?;
        for (number, files) in &snapshot.new_files {
            let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            protocol::send_generation(&self.sock, *number, &fds)?;
        }
        let seq = sent.highest + 1;
        sent.highest = seq;
        let json = serde_json::to_vec(&snapshot.state).map_err(|e| ProtocolError(format!("encoding: {e}")))?;
        let state = protocol::seal_state(seq, &json).map_err(|e| ProtocolError(format!("a state memfd: {e}")))?;
        let manifest = Manifest {
            seq,
            generations: snapshot.generations.clone(),
        };
        let mut fds = vec![state.as_fd(), snapshot.counts.as_fd()];
        fds.extend(snapshot.spec.as_ref().map(|f| f.as_fd()));
        crate::failpoint::hit("server-checkpoint-send").map_err(ProtocolError)?;
        self.send(Tag::Checkpoint, &manifest.encode(), &fds)?;
        tracing::info!("checkpoint {seq} sent");
        let answer = self.wait_for(seq);
        if answer.is_err() {
            // Refused, or no answer: what the supervisor holds is the last
            // acknowledged set, or (answered late) this one.
            sent.generations.clear();
        }
        match answer? {
            None => {
                sent.alone = true;
                Ok(())
            }
            Some(()) => {
                sent.seq = seq;
                sent.generations = snapshot.generations.iter().map(|&(n, _)| n).collect();
                Ok(())
            }
        }
    }

    /// `Some` once checkpoint `seq` is acknowledged, `None` if the
    /// supervisor is gone.
    fn wait_for(&self, seq: u64) -> Result<Option<()>, ProtocolError> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let answer = if self.routed.load(std::sync::atomic::Ordering::SeqCst) {
                answers.recv_timeout(ANSWER_TIMEOUT)
            } else {
                self.read_answer()
            };
            match answer {
                Ok(Answer::Ack(n)) if n == seq => return Ok(Some(())),
                Ok(Answer::Nak(n, why)) if n == seq => {
                    return Err(ProtocolError(format!("the supervisor refused checkpoint {seq}: {why}")))
                }
                // An answer to an earlier checkpoint that timed out.
                Ok(Answer::Ack(_) | Answer::Nak(..)) => continue,
                Ok(Answer::Gone) | Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ProtocolError(format!(
                        "the supervisor did not answer checkpoint {seq} within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    )))
                }
            }
        }
    }

    /// An answer read from the socket itself, before any reader thread.
    fn read_answer(&self) -> Result<Answer, RecvTimeoutError> {
        match protocol::recv(&self.sock) {
            Ok(Some(m)) if matches!(m.tag, Tag::Ack | Tag::Nak) => match m.number() {
                Ok((seq, _)) if m.tag == Tag::Ack => Ok(Answer::Ack(seq)),
                Ok((seq, why)) => Ok(Answer::Nak(seq, String::from_utf8_lossy(why).into_owned())),
                Err(e) => Ok(Answer::Nak(0, e.0)),
            },
            Ok(Some(m)) => Ok(Answer::Nak(
                0,
                format!("the supervisor sent {:?} before answering", m.tag),
            )),
            Ok(None) | Err(_) => Err(RecvTimeoutError::Disconnected),
        }
    }

    /// The next message from the supervisor, for a successor before it
    /// serves (nobody else reads the socket yet).
    pub fn recv(&self) -> Result<Message, ProtocolError> {
        protocol::recv(&self.sock)?.ok_or_else(|| ProtocolError("the supervisor went away".into()))
    }
}

/// What a successor receives before it serves: the connection, and the
/// state exactly as the last acknowledged checkpoint has it.
pub struct Received {
    pub init: InitRecord,
    pub fuse: OwnedFd,
    pub seq: u64,
    pub checkpoint: Checkpoint,
    pub files: HashMap<u32, Vec<std::fs::File>>,
    pub counts: OwnedFd,
    /// The CDI spec's memfd, when the checkpoint names one.
    pub spec: Option<std::fs::File>,
}

/// Reads what the supervisor replays to a new server. Everything is
/// checked against everything else: a count that does not add up, a
/// sequence number that differs between the manifest and the state, a
/// state of another protocol version, a field this build does not know.
pub fn receive(link: &Link) -> Result<Received, ProtocolError> {
    let bad = |what: String| ProtocolError(what);
    let connection = link.recv()?;
    if connection.tag != Tag::Connection {
        return Err(bad(format!(
            "the supervisor sent {:?} before the connection",
            connection.tag
        )));
    }
    let init: InitRecord =
        serde_json::from_slice(&connection.body).map_err(|e| bad(format!("the connection's INIT record: {e}")))?;
    let fuse = connection
        .fds
        .into_iter()
        .next()
        .ok_or_else(|| bad("the supervisor sent no FUSE descriptor".into()))?;
    let mut files: HashMap<u32, Vec<std::fs::File>> = HashMap::new();
    let mut totals: HashMap<u32, u32> = HashMap::new();
    let (manifest, mut fds) = loop {
        let m = link.recv()?;
        match m.tag {
            Tag::Generation => {
                let batch = protocol::GenerationBatch::decode(&m.body)?;
                let held = files.entry(batch.number).or_default();
                if batch.first as usize != held.len()
                    || *totals.entry(batch.number).or_insert(batch.total) != batch.total
                {
                    return Err(bad(format!("generation {}'s files came out of order", batch.number)));
                }
                held.extend(m.fds.into_iter().map(std::fs::File::from));
            }
            Tag::Checkpoint => break (Manifest::decode(&m.body)?, m.fds),
            other => return Err(bad(format!("the supervisor sent {other:?} inside a checkpoint"))),
        }
    };
    if !(2..=3).contains(&fds.len()) {
        return Err(bad(format!("a checkpoint with {} descriptors", fds.len())));
    }
    let spec = (fds.len() == 3).then(|| fds.pop().map(std::fs::File::from)).flatten();
    let counts = fds.pop().expect("two");
    let state = fds.pop().expect("two");
    for &(number, count) in &manifest.generations {
        let held = files.get(&number).map_or(0, Vec::len);
        if held != count as usize || totals.get(&number).is_some_and(|&t| t != count) {
            return Err(bad(format!(
                "generation {number} came with {held} of its {count} files"
            )));
        }
    }
    let (seq, json) = protocol::open_state(&state)?;
    if seq != manifest.seq {
        return Err(bad(format!(
            "the state is checkpoint {seq} but the manifest says {}",
            manifest.seq
        )));
    }
    let checkpoint: Checkpoint =
        serde_json::from_slice(&json).map_err(|e| bad(format!("the checkpoint cannot be read exactly: {e}")))?;
    Ok(Received {
        init,
        fuse,
        seq,
        checkpoint,
        files,
        counts,
        spec,
    })
}
