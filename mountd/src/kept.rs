//! What the supervisor keeps for the next server: the connection, each
//! live generation's held files, and the last acknowledged checkpoint.
//! It reads only the protocol's small binary bodies; the state itself it
//! holds and passes on as the sealed memfd it came in.
//!
//! One rule keeps both sides in step: the supervisor holds exactly the
//! generations of the last checkpoint it acknowledged (and those arriving
//! for the next one). A checkpoint is acknowledged only when every file
//! of every generation it names is here, its number is above the last
//! one's, and nothing went wrong since; otherwise it is refused with the
//! reason, and what arrived for it is dropped.

use crate::protocol::{self, GenerationBatch, Manifest, Message, ProtocolError, Tag};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

#[derive(Default)]
pub struct Kept {
    /// The FUSE connection and its INIT record, as the first server sent it.
    pub connection: Option<Message>,
    /// Held files of the last acknowledged checkpoint's generations, and
    /// how many each has.
    generations: BTreeMap<u32, (u32, Vec<OwnedFd>)>,
    /// Files arriving for the next checkpoint, by generation: kept apart,
    /// so that a generation sent again (after an answer that never came)
    /// cannot spoil the acknowledged one if this checkpoint is refused.
    arriving: BTreeMap<u32, (u32, Vec<OwnedFd>)>,
    /// The highest checkpoint number any server sent, acknowledged or not:
    /// a successor numbers its own above it, so that no number is used
    /// for two different checkpoints.
    highest: u64,
    /// The last acknowledged checkpoint and its message (state memfd,
    /// counters memfd, and the CDI spec's memfd if there is one).
    checkpoint: Option<(Manifest, Message)>,
    /// Why the checkpoint being sent cannot be acknowledged.
    problem: Option<String>,
}

/// What taking a message from a server gives: nothing, or the answer to a
/// checkpoint.
pub enum Taken {
    Nothing,
    Answer(Message),
}

impl Kept {
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// A number another supervisor saw (the daemon taken over).
    pub fn saw(&mut self, seq: u64) {
        self.highest = self.highest.max(seq);
    }

    /// Whether the kernel has ended the connection (aborted through
    /// /sys/fs/fuse/connections, or its mount forced away): the device
    /// then polls as an error, and no server can answer on it again.
    pub fn connection_aborted(&self) -> bool {
        let Some(fd) = self.connection.as_ref().and_then(|m| m.fds.first()) else {
            return false;
        };
        let mut poll = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
            && poll[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLERR))
    }

    /// Whether a successor can be started from what is here.
    pub fn complete(&self) -> bool {
        self.connection.is_some() && self.checkpoint.is_some()
    }

    pub fn checkpoint(&self) -> Option<&(Manifest, Message)> {
        self.checkpoint.as_ref()
    }

    /// How many descriptors are held, for the log.
    pub fn descriptors(&self) -> usize {
        self.generations.values().map(|(_, f)| f.len()).sum::<usize>()
            + self.checkpoint.as_ref().map_or(0, |(_, m)| m.fds.len())
            + self.connection.as_ref().map_or(0, |m| m.fds.len())
    }

    pub fn generations(&self) -> impl Iterator<Item = (u32, &[OwnedFd])> {
        self.generations.iter().map(|(&n, (_, files))| (n, files.as_slice()))
    }

    /// Something the server sent broke the protocol (the reader says
    /// what): the checkpoint being sent cannot be trusted.
    pub fn broken(&mut self, why: String) {
        self.problem.get_or_insert(why);
    }

    /// Takes one message from the serving process.
    pub fn take(&mut self, m: Message) -> Result<Taken, ProtocolError> {
        match m.tag {
            Tag::Connection => {
                if m.fds.len() != 1 {
                    return Err(ProtocolError(format!("a connection with {} descriptors", m.fds.len())));
                }
                self.connection = Some(m);
                Ok(Taken::Nothing)
            }
            Tag::Generation => {
                let batch = GenerationBatch::decode(&m.body)?;
                // A generation's first batch starts it afresh: a server that
                // does not know what this supervisor holds sends it whole.
                if batch.first == 0 {
                    self.arriving.remove(&batch.number);
                }
                let (total, files) = self.arriving.entry(batch.number).or_insert((batch.total, Vec::new()));
                if batch.first as usize != files.len() || *total != batch.total {
                    self.broken(format!("generation {}'s files came out of order", batch.number));
                } else {
                    files.extend(m.fds);
                }
                Ok(Taken::Nothing)
            }
            Tag::Checkpoint => {
                let manifest = Manifest::decode(&m.body)?;
                let seq = manifest.seq;
                let answer = match self.check(&manifest, &m) {
                    Ok(()) => {
                        let mut arriving = std::mem::take(&mut self.arriving);
                        let acked = std::mem::take(&mut self.generations);
                        let mut acked: BTreeMap<u32, _> = acked.into_iter().collect();
                        self.generations = (manifest.generations.iter())
                            .filter_map(|&(n, _)| arriving.remove(&n).or_else(|| acked.remove(&n)).map(|g| (n, g)))
                            .collect();
                        self.checkpoint = Some((manifest, m));
                        Message::new(Tag::Ack, protocol::number_body(seq, ""), Vec::new())
                    }
                    Err(why) => {
                        tracing::error!("refused checkpoint {seq}: {why}");
                        self.arriving.clear();
                        Message::new(Tag::Nak, protocol::number_body(seq, &why), Vec::new())
                    }
                };
                self.problem = None;
                self.highest = self.highest.max(seq);
                Ok(Taken::Answer(answer))
            }
            other => Err(ProtocolError(format!("{other:?} is not part of a checkpoint"))),
        }
    }

    fn check(&self, manifest: &Manifest, m: &Message) -> Result<(), String> {
        if let Some(problem) = &self.problem {
            return Err(problem.clone());
        }
        if manifest.seq <= self.highest {
            return Err(format!("it is stale: number {} after {}", manifest.seq, self.highest));
        }
        if !(2..=3).contains(&m.fds.len()) {
            return Err(format!("it came with {} descriptors, not 2 or 3", m.fds.len()));
        }
        for &(number, count) in &manifest.generations {
            match self.arriving.get(&number).or_else(|| self.generations.get(&number)) {
                Some((total, files)) if *total == count && files.len() == count as usize => {}
                Some((total, files)) => {
                    return Err(format!(
                        "generation {number} has {} of {total} files here, the checkpoint says {count}",
                        files.len()
                    ))
                }
                None => return Err(format!("generation {number}'s files never came")),
            }
        }
        Ok(())
    }

    /// Sends a new server everything, as the protocol orders it.
    pub fn replay(&self, sock: &impl AsFd) -> Result<(), ProtocolError> {
        let (Some(connection), Some((manifest, checkpoint))) = (&self.connection, &self.checkpoint) else {
            return Err(ProtocolError("no connection and checkpoint to hand over yet".into()));
        };
        protocol::send_message(sock, connection)?;
        for &(number, _) in &manifest.generations {
            let (_, files) = &self.generations[&number];
            let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            protocol::send_generation(sock, number, &fds)?;
        }
        protocol::send_message(sock, checkpoint)
    }

    /// Puts together what systemd kept: the connection, the generations'
    /// files and the checkpoint, checked as a server's would be.
    pub fn from_parts(
        connection: Message,
        generations: BTreeMap<u32, Vec<OwnedFd>>,
        checkpoint: Message,
    ) -> Result<Kept, ProtocolError> {
        let mut kept = Kept {
            connection: Some(connection),
            ..Kept::default()
        };
        for (number, files) in generations {
            kept.generations.insert(number, (files.len() as u32, files));
        }
        let manifest = Manifest::decode(&checkpoint.body)?;
        kept.check(&manifest, &checkpoint).map_err(ProtocolError)?;
        kept.highest = manifest.seq;
        kept.checkpoint = Some((manifest, checkpoint));
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    fn generation(number: u32, first: u32, total: u32, n: usize) -> Message {
        let batch = GenerationBatch { number, first, total };
        Message::new(Tag::Generation, batch.encode(), files(n))
    }

    fn checkpoint(seq: u64, generations: &[(u32, u32)]) -> Message {
        let manifest = Manifest {
            seq,
            generations: generations.to_vec(),
        };
        Message::new(Tag::Checkpoint, manifest.encode(), files(2))
    }

    /// The answer's tag and, for a refusal, its reason.
    fn answer(kept: &mut Kept, m: Message) -> (Tag, String) {
        match kept.take(m).unwrap() {
            Taken::Answer(a) => (a.tag, String::from_utf8_lossy(a.number().unwrap().1).into_owned()),
            Taken::Nothing => panic!("no answer"),
        }
    }

    #[test]
    fn only_whole_newer_checkpoints_are_acknowledged() {
        let mut kept = Kept::default();
        kept.take(Message::new(Tag::Connection, b"{}".to_vec(), files(1)))
            .unwrap();
        kept.take(generation(0, 0, 3, 3)).unwrap();
        assert_eq!(answer(&mut kept, checkpoint(1, &[(0, 3)])).0, Tag::Ack);
        assert!(kept.complete());

        // Stale: a number not above the last.
        let (tag, why) = answer(&mut kept, checkpoint(1, &[(0, 3)]));
        assert_eq!(tag, Tag::Nak);
        assert!(why.contains("stale"), "{why}");

        // A generation whose files did not all come; what came is dropped.
        kept.take(generation(1, 0, 3, 2)).unwrap();
        let (tag, why) = answer(&mut kept, checkpoint(2, &[(0, 3), (1, 3)]));
        assert_eq!(tag, Tag::Nak);
        assert!(why.contains("generation 1 has 2 of 3"), "{why}");
        assert_eq!(kept.generations().map(|(n, _)| n).collect::<Vec<_>>(), vec![0]);

        // Batches out of order, or one the reader found broken: refused.
        kept.take(generation(1, 2, 3, 1)).unwrap();
        let (tag, why) = answer(&mut kept, checkpoint(3, &[(0, 3), (1, 3)]));
        assert_eq!(tag, Tag::Nak);
        assert!(why.contains("out of order"), "{why}");
        kept.broken("descriptors dropped (MSG_CTRUNC)".into());
        let (tag, why) = answer(&mut kept, checkpoint(4, &[(0, 3)]));
        assert_eq!((tag, why.contains("MSG_CTRUNC")), (Tag::Nak, true), "{why}");

        // Whole again, then a checkpoint that drops generation 0: its
        // files are let go.
        kept.take(generation(1, 0, 3, 3)).unwrap();
        assert_eq!(answer(&mut kept, checkpoint(5, &[(0, 3), (1, 3)])).0, Tag::Ack);
        assert_eq!(kept.descriptors(), 1 + 6 + 2);
        assert_eq!(answer(&mut kept, checkpoint(6, &[(1, 3)])).0, Tag::Ack);
        assert_eq!(kept.descriptors(), 1 + 3 + 2);
    }

    /// After an answer that never came, a server sends every generation
    /// again under a new number: arriving files never spoil the held ones,
    /// and no number is taken twice.
    #[test]
    fn a_generation_sent_again_replaces_only_what_arrives() {
        let mut kept = Kept::default();
        kept.take(Message::new(Tag::Connection, b"{}".to_vec(), files(1)))
            .unwrap();
        kept.take(generation(0, 0, 3, 3)).unwrap();
        assert_eq!(answer(&mut kept, checkpoint(1, &[(0, 3)])).0, Tag::Ack);
        // Generation 0 sent again whole, and generation 1 in part: refused,
        // and the acknowledged generation 0 is as it was.
        kept.take(generation(0, 0, 3, 3)).unwrap();
        kept.take(generation(1, 0, 2, 1)).unwrap();
        let (tag, why) = answer(&mut kept, checkpoint(2, &[(0, 3), (1, 2)]));
        assert_eq!(tag, Tag::Nak, "{why}");
        assert_eq!(kept.descriptors(), 1 + 3 + 2);
        // Number 2 was refused, but it was used: it is stale from now on.
        kept.take(generation(0, 0, 3, 3)).unwrap();
        let (tag, why) = answer(&mut kept, checkpoint(2, &[(0, 3)]));
        assert_eq!((tag, why.contains("stale")), (Tag::Nak, true), "{why}");
        assert_eq!(kept.highest(), 2);
        // Sent again whole under 3: acknowledged, with the new files.
        kept.take(generation(0, 0, 3, 3)).unwrap();
        kept.take(generation(1, 0, 2, 2)).unwrap();
        assert_eq!(answer(&mut kept, checkpoint(3, &[(0, 3), (1, 2)])).0, Tag::Ack);
        assert_eq!(kept.descriptors(), 1 + 5 + 2);
    }

    #[test]
    fn a_replay_is_what_a_successor_can_check() {
        let mut kept = Kept::default();
        assert!(
            kept.replay(&protocol::pair().unwrap().0).is_err(),
            "nothing to replay yet"
        );
        kept.take(Message::new(Tag::Connection, b"{}".to_vec(), files(1)))
            .unwrap();
        kept.take(generation(4, 0, 250, 200)).unwrap();
        kept.take(generation(4, 200, 250, 50)).unwrap();
        assert_eq!(answer(&mut kept, checkpoint(9, &[(4, 250)])).0, Tag::Ack);
        let (ours, theirs) = protocol::pair().unwrap();
        kept.replay(&ours).unwrap();
        let mut got = Vec::new();
        while let Some(m) = protocol::recv(&theirs).unwrap() {
            let last = m.tag == Tag::Checkpoint;
            got.push((m.tag, m.fds.len()));
            if last {
                break;
            }
        }
        assert_eq!(
            got,
            vec![
                (Tag::Connection, 1),
                (Tag::Generation, 200),
                (Tag::Generation, 50),
                (Tag::Checkpoint, 2)
            ]
        );
    }
}
