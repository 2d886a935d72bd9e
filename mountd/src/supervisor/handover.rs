//! Takeovers between daemons (`--take-over`): the side taken over
//! (`HandingOver`) and the side taking over (`Joining`), the socket they
//! meet on, and what each does when the other fails, stalls or goes away.

use super::*;

impl Supervisor {
    /// Listens for a daemon that would take this one over. A daemon that is
    /// taking another over listens only once that is done: until then the
    /// other may go on serving (a takeover given up), and its socket, which
    /// this one's would replace, must stay where the next daemon looks.
    pub(super) fn listen_for_takeovers(&mut self) -> Result<(), DaemonError> {
        let path = crate::peer::path(&self.command.state_dir, &self.mountpoint);
        let listener = crate::peer::listen_at(&path)?;
        self.takeover_socket = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (path.clone(), std::os::unix::fs::MetadataExt::ino(&m)));
        let events = self.events.clone();
        crate::peer::accept_loop(listener, self.command.state_dir.clone(), move |sock, offer| {
            let _ = events.send(Event::Offered(sock, offer));
        });
        Ok(())
    }

    /// A peer of a takeover, read by a thread of its own.
    pub(super) fn peer(&mut self, sock: OwnedFd, pid: u32) -> Peer {
        // The socket comes with the receive timeout of its first exchange
        // (5 s for an offer, ANSWER_LIMIT for the joiner's answers); the
        // reader below must wait as long as a step may take, which the
        // step limits of the phases decide, not a recv that gives up and
        // passes for the other daemon going away.
        if let Err(e) = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 0),
        ) {
            tracing::warn!("clearing the receive timeout of the takeover socket: {e}");
        }
        self.peers += 1;
        let id = self.peers;
        match sock.try_clone() {
            Ok(reader) => {
                let events = self.events.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("peer-{pid}"))
                    .spawn(move || read_peer(id, &reader, &events));
                if let Err(e) = spawned {
                    tracing::error!("starting a reader for pid {pid}: {e}");
                }
            }
            Err(e) => tracing::error!("a reader for pid {pid}: {e}"),
        }
        // No send to the other daemon may hold up this supervisor's loop.
        protocol::send_deadline(&sock);
        Peer { id, sock, pid }
    }

    /// What a takeover hands on: the mount point's lock, then everything
    /// kept, as a new server of this daemon's own would get it.
    pub(super) fn hand_over(&self, peer: &Peer) -> Result<(), ProtocolError> {
        let lock = self
            .lock
            .as_ref()
            .ok_or_else(|| ProtocolError("the mount point's lock was handed on already".into()))?;
        // With the status socket's listener (the other daemon's servers
        // answer on it, so no file is bound twice), and the highest
        // checkpoint number this mount's servers sent, so that the other
        // daemon's server numbers its own above it.
        let mut fds = vec![lock.as_fd()];
        fds.extend(self.status.as_ref().map(|s| s.listener.as_fd()));
        protocol::send(&peer.sock, Tag::Lock, &self.kept.highest().to_le_bytes(), &fds)?;
        crate::failpoint::hit("handover-lock").map_err(ProtocolError)?;
        // The mount's handovers so far, so that `status` goes on listing them.
        let history = serde_json::to_vec(&self.history).map_err(|e| ProtocolError(e.to_string()))?;
        protocol::send(&peer.sock, Tag::History, &history, &[])?;
        self.kept.replay(&peer.sock)?;
        crate::failpoint::hit("handover-replayed").map_err(ProtocolError)?;
        tracing::info!(
            pid = peer.pid,
            checkpoint = self.kept.checkpoint().map_or(0, |(m, _)| m.seq),
            descriptors = self.kept.descriptors(),
            "take-over: handed the connection and the final checkpoint over"
        );
        Ok(())
    }

    /// Another daemon offers to take over: only from one server serving,
    /// with everything kept, and a daemon of this protocol.
    pub(super) fn offered(&mut self, sock: OwnedFd, offer: protocol::Offer) {
        let refuse = |why: String| {
            tracing::warn!(
                "refused a takeover by pid {} (nvlibfs {}): {why}",
                offer.pid,
                offer.version
            );
            let _ = protocol::send(&sock, Tag::Refused, why.as_bytes(), &[]);
        };
        if offer.protocol != protocol::VERSION {
            return refuse(format!(
                "it speaks handover protocol {} and this daemon {}: a takeover must restore the state exactly, \
                 so it is refused; stop this daemon and mount afresh",
                offer.protocol,
                protocol::VERSION
            ));
        }
        if let Err(e) = crate::failpoint::hit("handover-offered") {
            return refuse(e);
        }
        let server = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Serving(server) if self.kept.complete() => server,
            other => {
                let why = format!("this daemon is {}; a takeover needs one server serving", other.name());
                self.phase = other;
                return refuse(why);
            }
        };
        tracing::info!(
            pid = offer.pid,
            version = %offer.version,
            "take-over: another daemon takes over; freezing pid {}",
            server.pid
        );
        server.send(Tag::Freeze, &[]);
        let peer = self.peer(sock, offer.pid);
        self.phase = Phase::HandingOver {
            old: server,
            peer,
            step: Handing::Freezing,
            since: Instant::now(),
        };
    }

    /// A message from the other daemon of a takeover.
    pub(super) fn peer_said(&mut self, id: u64, m: Message) -> Result<Option<i32>, DaemonError> {
        let current = match &self.phase {
            Phase::HandingOver { peer, .. } | Phase::Joining { peer, .. } => peer.id == id,
            _ => false,
        };
        if !current {
            tracing::debug!("{:?} from a takeover that is over", m.tag);
            return Ok(None);
        }
        self.phase = match (std::mem::replace(&mut self.phase, Phase::Moving), m.tag) {
            (
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Preparing,
                    ..
                },
                Tag::Prepared,
            ) => Phase::HandingOver {
                old,
                peer,
                step: Handing::Overlap,
                since: Instant::now(),
            },
            (
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Overlap,
                    ..
                },
                Tag::Ready,
            ) => {
                if let Err(e) = crate::failpoint::hit("handover-drain") {
                    peer.send(Tag::Refused, e.as_bytes());
                    self.give_up_takeover(old, &peer, Other::MayRead, e);
                    return Ok(None);
                }
                tracing::info!(
                    pid = peer.pid,
                    "take-over: the other daemon's server answers; draining ours"
                );
                old.send(Tag::Drain, &[]);
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Draining,
                    since: Instant::now(),
                }
            }
            (Phase::HandingOver { old, peer, step, .. }, Tag::Refused) if step != Handing::Draining => {
                let why = format!("the daemon taking over (pid {}) refused: {}", peer.pid, m.text());
                // It stopped its server before it said so.
                let other = if step == Handing::Overlap {
                    Other::Stopped
                } else {
                    Other::NeverRead
                };
                self.give_up_takeover(old, &peer, other, why);
                return Ok(None);
            }
            (
                Phase::Joining {
                    new,
                    peer,
                    step: Handing::Draining,
                    ..
                },
                Tag::Drained,
            ) => {
                let (old_server, _) = m.number().unwrap_or((0, &[]));
                self.joined(new, &peer, old_server as u32)?;
                return Ok(None);
            }
            (Phase::Joining { new, peer, .. }, Tag::Refused) => {
                new.kill(Signal::SIGKILL);
                return Err(DaemonError::new(format!(
                    "the daemon taken over (pid {}) gave up: {}",
                    peer.pid,
                    m.text()
                )));
            }
            (phase, tag) => {
                tracing::warn!("{tag:?} from the other daemon while {}", phase.name());
                phase
            }
        };
        Ok(None)
    }

    /// The other daemon of a takeover went away.
    pub(super) fn peer_gone(&mut self, id: u64, why: String) -> Result<Option<i32>, DaemonError> {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::HandingOver { old, peer, step, .. } if peer.id == id && step != Handing::Draining => {
                let why = format!("the daemon taking over (pid {}) went away: {why}", peer.pid);
                // If its server had begun to read, what it read goes back
                // in the queue for ours.
                self.give_up_takeover(old, &peer, Other::read_if(step == Handing::Overlap), why);
            }
            Phase::Joining { new, peer, step, .. } if peer.id == id => {
                if step == Handing::Preparing {
                    new.kill(Signal::SIGKILL);
                    return Err(DaemonError::new(format!(
                        "the daemon taken over (pid {}) went away before this one was ready: {why}",
                        peer.pid
                    )));
                }
                // Both serve, or the other's drains. Which goes on is
                // the serving token's to say (daemon.rs, `orphaned`): held
                // on, the other's server serves on without its supervisor.
                tracing::error!(
                    "the daemon taken over (pid {}) went away during the takeover: {why}; serving on once its \
                     server has ended",
                    peer.pid
                );
                self.peer_left = Some(Instant::now());
                self.phase = Phase::Joining {
                    new,
                    peer,
                    step,
                    since: Instant::now(),
                };
            }
            other => {
                if let Phase::HandingOver { peer, .. } = &other {
                    if peer.id == id {
                        // Nobody would serve once ours has drained: this
                        // daemon still holds the connection, the lock and
                        // the final checkpoint, and takes the mount back.
                        tracing::error!(
                            "the daemon taking over (pid {}) went away while ours drained: {why}; taking the \
                             mount back once ours has drained",
                            peer.pid
                        );
                        self.take_back = true;
                    }
                }
                self.phase = other;
            }
        }
        Ok(None)
    }

    /// The daemon taken over went away mid-takeover: once its server has
    /// ended (the serving token is free), ours serves alone; if it still
    /// serves after half the step limit, it serves on, and ours drains and
    /// this daemon ends (the rule its orphaned server follows too).
    pub(super) fn peer_left(&mut self, since: Instant) -> Result<(), DaemonError> {
        let free = crate::statedir::serving_token(&self.command.state_dir, &self.mountpoint, Duration::ZERO).is_some();
        if !free && since.elapsed() < self.step_limit / 2 {
            return Ok(());
        }
        self.peer_left = None;
        let (new, peer) = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Joining { new, peer, .. } => (new, peer),
            // Stopped meanwhile: nothing left to decide.
            other => {
                self.phase = other;
                return Ok(());
            }
        };
        if free {
            // What the other's server held (if it died) goes back in the
            // queue, and ours goes on.
            self.resend();
            return self.joined(new, &peer, 0);
        }
        tracing::error!(
            "the server of the daemon taken over (pid {}) serves on without its supervisor: ours drains and this \
             daemon ends",
            peer.pid
        );
        new.send(Tag::Drain, &[]);
        self.gave_up = Some(format!(
            "--take-over failed: the daemon taken over (pid {}) went away during the takeover and its server serves \
             on",
            peer.pid
        ));
        self.phase = Phase::Stopping(Some(new));
        Ok(())
    }

    /// Our server has drained (or was stopped) while handing over: the
    /// other daemon serves from here on, unless it went away meanwhile,
    /// when a successor of ours takes the mount back.
    pub(super) fn drained_for(&mut self, old: Server, peer: &Peer) -> Result<Option<i32>, DaemonError> {
        if std::mem::take(&mut self.take_back) {
            self.refusal(
                old.pid,
                peer.pid,
                "the daemon taking over went away during the handover".into(),
            );
            self.crashes.push_back(Instant::now());
            self.recover("take-back", old.pid)?;
            return Ok(None);
        }
        match crate::failpoint::hit("handover-drained") {
            Ok(()) => peer.send(Tag::Drained, &(old.pid.as_raw() as u64).to_le_bytes()),
            Err(e) => tracing::error!("{e}: the other daemon is not told that ours drained"),
        }
        self.let_go();
        self.phase = Phase::HandedOver(Some(old));
        Ok(None)
    }

    /// Handed over: what this daemon held for the mount is the other's
    /// now. Holding on would keep a connection nobody reads alive (every
    /// access would hang if the other daemon died) and the lock held by a
    /// daemon that serves nothing; the other holds its own descriptors.
    pub(super) fn let_go(&mut self) {
        self.kept = Kept::default();
        self.lock = None;
        self.status = None;
    }

    /// This daemon's takeover is done: its server serves alone; or, if it
    /// died while the other daemon's drained, a successor recovers.
    pub(super) fn joined(&mut self, new: Server, peer: &Peer, old_server: u32) -> Result<(), DaemonError> {
        crate::privileges::drop_for_supervisor();
        if let Some(lock) = &mut self.lock {
            lock.take_sole();
        }
        if let Some(status) = &mut self.status {
            let socket = nvlibfs::control::socket_path(&self.command.state_dir, &self.mountpoint);
            status.identity = crate::statedir::StateDir::open(&self.command.state_dir)
                .ok()
                .and_then(|d| d.identity(&socket.file_name()?.to_string_lossy()));
        }
        if let Err(e) = self.listen_for_takeovers() {
            tracing::error!("{e}; a later --take-over will not find this daemon");
        }
        self.joined = true;
        if let Some(dead) = self.join_server_died.take() {
            tracing::error!("this daemon's server (pid {dead}) died during the takeover; starting another");
            self.crashes.push_back(Instant::now());
            return self.recover("crash", dead);
        }
        if let Err(e) = crate::failpoint::hit("join-sole") {
            // Its death is a crash like any other: a successor recovers.
            tracing::error!("{e}: stopping pid {}", new.pid);
            new.kill(Signal::SIGKILL);
        }
        new.send(Tag::Sole, &[]);
        self.record(
            "take-over",
            if old_server != 0 { old_server } else { peer.pid },
            &new,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        self.binary = new.binary.clone();
        self.phase = Phase::Serving(new);
        self.send_history();
        Ok(())
    }

    /// A takeover that cannot go on: our server thaws and serves on; what
    /// the other's read, if it had begun to read, goes back in the queue.
    /// Where the other's server may still be reading (its daemon went
    /// away or stalled), ours stays frozen and nothing is resent until that
    /// server's own deadline has passed (daemon.rs, `beside_deadline`): two
    /// servers of different states must never both read.
    pub(super) fn give_up_takeover(&mut self, old: Server, peer: &Peer, other: Other, why: String) {
        let pid = old.pid;
        self.phase = Phase::Serving(old);
        match other {
            Other::NeverRead => self.thaw_now(false),
            Other::Stopped => self.thaw_now(true),
            Other::MayRead => {
                self.pending_thaw = Some(Instant::now() + 3 * self.step_limit + Duration::from_secs(1));
                tracing::warn!(
                    "the other daemon's server may still read: thawing and resending in {:.0} s",
                    (3 * self.step_limit).as_secs_f64() + 1.0
                );
            }
        }
        self.refusal(pid, peer.pid, why);
    }

    /// Thaws the serving server; with `resend`, what another server had
    /// read and not answered goes back in the queue first.
    pub(super) fn thaw_now(&mut self, resend: bool) {
        self.pending_thaw = None;
        if let Phase::Serving(server) = &self.phase {
            if resend {
                self.resend();
            }
            server.send(Tag::Thaw, &[]);
        }
    }

    /// Handed over and the old server gone: this daemon is done. In the
    /// foreground it waits to be stopped (a platform restarts what exits);
    /// either way the lock stays with the daemon that took over.
    pub(super) fn handed_over(&mut self) -> Option<i32> {
        if self.command.foreground && !self.stop_requested {
            tracing::info!("handed over; nothing left to do here until this daemon is stopped");
            self.phase = Phase::HandedOver(None);
            return None;
        }
        Some(0)
    }

    pub(super) fn takeover_too_slow(&mut self) -> Result<Option<i32>, DaemonError> {
        let why = format!("a step of the takeover took over {} s", self.step_limit.as_secs_f64());
        tracing::error!("{why}");
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Draining,
                ..
            } => {
                // A thread of our server stuck in a request: it goes, and
                // what it held goes back in the queue for the other's.
                old.kill(Signal::SIGKILL);
                self.resend();
                return self.drained_for(old, &peer);
            }
            Phase::HandingOver { old, peer, step, .. } => {
                peer.send(Tag::Refused, why.as_bytes());
                self.give_up_takeover(old, &peer, Other::read_if(step == Handing::Overlap), why);
            }
            // The other daemon was told to drain (or its supervisor stalled
            // before it could be): its own limit stops its server and says
            // so. Told nothing after twice that, the serving token decides:
            // free, the other's server has ended and ours goes on alone;
            // held, it serves on and ours drains (as `peer_left`).
            Phase::Joining {
                new,
                peer,
                step: Handing::Draining,
                since,
            } => {
                tracing::error!(
                    "the daemon taken over (pid {}) did not say that its server drained",
                    peer.pid
                );
                self.phase = Phase::Joining {
                    new,
                    peer,
                    step: Handing::Draining,
                    since,
                };
                self.peer_left(Instant::now().checked_sub(self.step_limit).unwrap_or_else(Instant::now))?;
            }
            Phase::Joining { new, peer, .. } => {
                new.stop();
                peer.send(Tag::Refused, why.as_bytes());
                return Err(DaemonError::new(format!("--take-over failed: {why}")));
            }
            other => self.phase = other,
        }
        Ok(None)
    }
}

/// What a daemon taken over handed on.
pub(super) struct HandedOn {
    pub(super) lock: MountLock,
    pub(super) status: Option<OwnedFd>,
    pub(super) sock: OwnedFd,
    pub(super) pid: u32,
    pub(super) kept: Kept,
    pub(super) history: Vec<Handover>,
}

/// `--take-over`: having offered over `sock`, receives in order the mount
/// point's lock, the handovers so far and everything the daemon taken over
/// keeps, checked as any checkpoint is.
pub(super) fn join(sock: OwnedFd, state_dir: &Path, mountpoint: &Path) -> Result<HandedOn, DaemonError> {
    let mut first = crate::peer::answer(&sock, "handing over its lock")?;
    if first.tag == Tag::Challenge {
        // It cannot see this process (another PID namespace): proving
        // CAP_SYS_ADMIN is setting the attribute it names.
        let text = first.text();
        let (name, nonce) = text.split_once('\n').unwrap_or_default();
        nvlibfs::control::prove(state_dir, name, nonce).map_err(|e| {
            DaemonError::new(format!(
                "--take-over: the running daemon asked this one to prove CAP_SYS_ADMIN by setting {} on {}: {e}",
                nvlibfs::control::PROOF_XATTR,
                state_dir.join(name).display()
            ))
        })?;
        protocol::send(&sock, Tag::Proved, &[], &[])
            .map_err(|e| DaemonError::new(format!("--take-over: answering the running daemon: {e}")))?;
        first = crate::peer::answer(&sock, "handing over its lock")?;
    }
    let pid = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid() as u32)
        .unwrap_or(0);
    let highest = first.number().map_or(0, |(n, _)| n);
    let (lock, status) = match first.tag {
        // The lock, and the status socket's listener (a daemon of before
        // it was handed on sends none: this one binds its own).
        Tag::Lock if (1..=2).contains(&first.fds.len()) => {
            let mut fds = first.fds.into_iter();
            let lock = MountLock::handed_on(fds.next().expect("one descriptor"), state_dir, mountpoint)?;
            crate::failpoint::hit("join-lock").map_err(DaemonError::new)?;
            (lock, fds.next())
        }
        Tag::Refused => {
            return Err(DaemonError::new(format!(
                "the daemon serving this mount point (pid {pid}) refused the takeover: {}",
                first.text()
            )))
        }
        other => {
            return Err(DaemonError::new(format!(
                "the daemon taken over (pid {pid}) sent {other:?} with {} descriptors where its lock belongs",
                first.fds.len()
            )))
        }
    };
    let mut kept = Kept::default();
    let mut history = Vec::new();
    loop {
        let m = crate::peer::answer(&sock, "handing over what it keeps")?;
        let checkpoint = m.tag == Tag::Checkpoint;
        match m.tag {
            Tag::Refused => {
                return Err(DaemonError::new(format!(
                    "the daemon taken over (pid {pid}) gave up: {}",
                    m.text()
                )))
            }
            Tag::History => {
                // Only for `status`: a history it cannot read is dropped.
                history = serde_json::from_slice(&m.body).unwrap_or_else(|e| {
                    tracing::warn!("the handovers of the daemon taken over: {e}");
                    Vec::new()
                });
                continue;
            }
            _ => {}
        }
        match kept.take(m) {
            Ok(Taken::Answer(answer)) if answer.tag == Tag::Nak => {
                return Err(DaemonError::new(format!(
                    "what the daemon taken over (pid {pid}) handed over is not whole: {}",
                    answer.text()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(DaemonError::new(format!("what pid {pid} handed over: {e}"))),
        }
        if checkpoint {
            break;
        }
    }
    if !kept.complete() {
        return Err(DaemonError::new(format!(
            "pid {pid} handed over a checkpoint without its connection"
        )));
    }
    kept.saw(highest);
    // From here on a reader thread waits as long as it takes.
    let forever = nix::sys::time::TimeVal::new(0, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &forever)
        .map_err(|e| DaemonError::new(format!("the takeover socket: {e}")))?;
    Ok(HandedOn {
        lock,
        status,
        sock,
        pid,
        kept,
        history,
    })
}

/// Passes a peer's messages on as events, then its going.
pub(super) fn read_peer(id: u64, sock: &OwnedFd, events: &mpsc::Sender<Event>) {
    let why = loop {
        match protocol::recv(sock) {
            Ok(Some(m)) => {
                if events.send(Event::Peer(id, m)).is_err() {
                    return;
                }
            }
            Ok(None) => break "it closed the socket".to_owned(),
            Err(e) => break e.0,
        }
    };
    let _ = events.send(Event::PeerGone(id, why));
}

/// Whether the other daemon's server read the connection when a takeover
/// is given up, and whether it may still.
pub(super) enum Other {
    NeverRead,
    /// It read, and was stopped (and reaped) before its daemon said so.
    Stopped,
    /// It read, and its daemon went away or stalled: it may still read.
    MayRead,
}

impl Other {
    fn read_if(read: bool) -> Other {
        if read {
            Other::MayRead
        } else {
            Other::NeverRead
        }
    }
}
