//! The steps a restart shares with a takeover and with systemd's restart:
//! freeze, prepare, overlap, drain, and giving each up. `nvlibfs restart`
//! (SIGUSR2) starts here; each step's failure is handled beside the step.

use super::*;

impl Supervisor {
    /// The old server's final checkpoint is kept: start the new binary on it.
    pub(super) fn frozen(&mut self, pid: Pid) -> Result<(), DaemonError> {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Freezing,
                binary,
                ..
            } if old.pid == pid => match crate::failpoint::hit("restart-prepare")
                .map_err(DaemonError::new)
                .and_then(|()| self.start_successor(&binary))
            {
                Ok(new) => {
                    tracing::info!(
                        pid = new.pid.as_raw(),
                        checkpoint = self.kept.checkpoint().map_or(0, |(m, _)| m.seq),
                        "restart: starting {} on the old server's final checkpoint",
                        binary.path.display()
                    );
                    Phase::Restarting {
                        old,
                        step: Step::Preparing(new),
                        binary,
                        since: Instant::now(),
                    }
                }
                Err(e) => {
                    self.give_up_restart(old, New::None, false, e.to_string());
                    return Ok(());
                }
            },
            Phase::Leaving {
                old,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                // The final checkpoint is acknowledged, so it is in the
                // store: what the next daemon takes over.
                old.send(Tag::Drain, &[]);
                Phase::Leaving {
                    old,
                    step: Handing::Draining,
                    since: Instant::now(),
                }
            }
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => match self.hand_over(&peer) {
                Ok(()) => Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Preparing,
                    since: Instant::now(),
                },
                Err(e) => {
                    let why = format!("handing over: {e}");
                    peer.send(Tag::Refused, why.as_bytes());
                    self.give_up_takeover(old, &peer, handover::Other::NeverRead, why);
                    return Ok(());
                }
            },
            // A freeze that came after its step was given up: the server
            // must not stay frozen (no re-pin would happen again).
            Phase::Serving(server) if server.pid == pid => {
                tracing::warn!("pid {pid} froze after its restart or takeover was given up; thawing it");
                server.send(Tag::Thaw, &[]);
                Phase::Serving(server)
            }
            other => other,
        };
        Ok(())
    }

    /// A new server restored the state exactly: let it read the connection.
    pub(super) fn prepared(&mut self, pid: Pid) -> Result<(), DaemonError> {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Preparing(new),
                binary,
                ..
            } if new.pid == pid => {
                if let Err(e) = crate::failpoint::hit("restart-go") {
                    self.give_up_restart(old, New::Running(&new), false, e);
                    return Ok(());
                }
                // The old server answers until the new one does: no request
                // waits, none is resent.
                new.send(Tag::Go, &protocol::go_body(false, self.kept.highest()));
                Phase::Restarting {
                    old,
                    step: Step::Overlap(new),
                    binary,
                    since: Instant::now(),
                }
            }
            other => other,
        };
        if let Phase::Recovering { new, .. } = &self.phase {
            if new.pid == pid {
                // The dead server's unanswered requests go back in the
                // queue before anybody reads it again.
                self.resend();
                new.send(Tag::Go, &protocol::go_body(true, self.kept.highest()));
            }
        }
        if let Phase::Joining { new, peer, step, .. } = &self.phase {
            if new.pid == pid && *step == Handing::Preparing {
                if let Err(e) = crate::failpoint::hit("join-prepared") {
                    new.stop();
                    peer.send(Tag::Refused, e.as_bytes());
                    return Err(DaemonError::new(format!("--take-over failed: {e}")));
                }
            }
        }
        if let Phase::Joining { new, peer, step, since } = &mut self.phase {
            if new.pid == pid && *step == Handing::Preparing {
                // As in a restart: the old server answers until ours does.
                peer.send(Tag::Prepared, &[]);
                new.send(Tag::Go, &protocol::go_body(false, self.kept.highest()));
                *step = Handing::Overlap;
                *since = Instant::now();
            }
        }
        Ok(())
    }

    /// A server cannot do what a restart asked of it.
    pub(super) fn refused(&mut self, pid: Pid, why: String) -> Result<(), DaemonError> {
        tracing::error!("pid {pid} refused: {why}");
        // After a crash there is nobody to go back to: the server that
        // refused dies, and `exit` starts another or gives up.
        if let Phase::Recovering { new, .. } = &self.phase {
            if new.pid == pid {
                new.kill(Signal::SIGKILL);
            }
            return Ok(());
        }
        // A takeover this daemon cannot make exactly is not made: the
        // other daemon thaws and serves on.
        if let Phase::Joining { new, peer, .. } = &self.phase {
            if new.pid == pid {
                new.stop();
                peer.send(Tag::Refused, why.as_bytes());
                return Err(DaemonError::new(format!(
                    "--take-over refused: {why}; the running daemon (pid {}) serves on",
                    peer.pid
                )));
            }
        }
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            // The old server could not take its final checkpoint; it has
            // thawed itself.
            Phase::Restarting {
                old,
                step: Step::Freezing,
                ..
            } if old.pid == pid => {
                self.phase = Phase::Serving(old);
                self.refusal(pid, 0, why);
            }
            Phase::Restarting {
                old,
                step: Step::Preparing(new),
                ..
            } if new.pid == pid => self.give_up_restart(old, New::Running(&new), false, why),
            // No final checkpoint, so nothing to leave in the store: the
            // restart is a stop after all, which unmounts.
            Phase::Leaving {
                old,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                tracing::error!("cannot leave the connection to systemd's restart ({why}); unmounting");
                old.kill(Signal::SIGTERM);
                self.phase = Phase::Stopping(Some(old));
            }
            // Our server could not take its final checkpoint; it has
            // thawed itself.
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                peer.send(Tag::Refused, why.as_bytes());
                self.give_up_takeover(old, &peer, handover::Other::NeverRead, why);
            }
            other => self.phase = other,
        }
        Ok(())
    }

    /// The old server answered everything it held and reads no more: the
    /// new one serves alone.
    pub(super) fn drained(&mut self, pid: Pid) -> Result<(), DaemonError> {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Draining(new),
                binary,
                ..
            } if old.pid == pid => self.restarted(old, new, binary),
            Phase::Leaving {
                old,
                step: Handing::Draining,
                ..
            } if old.pid == pid => {
                tracing::info!("drained; the connection waits in systemd's fd store for the next daemon");
                self.stop_requested = true;
                self.phase = Phase::HandedOver(Some(old));
            }
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Draining,
                ..
            } if old.pid == pid => {
                tracing::info!(
                    pid = peer.pid,
                    "take-over: drained; the other daemon serves this mount point now"
                );
                self.drained_for(old, &peer)?;
            }
            other => self.phase = other,
        }
        Ok(())
    }

    /// `nvlibfs restart`: the binary on disk now, on the running server's
    /// final checkpoint.
    pub(super) fn restart(&mut self) {
        let server = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Serving(server) if self.kept.complete() => server,
            other => {
                tracing::warn!("SIGUSR2 while {}: a restart needs one server serving", other.name());
                self.phase = other;
                return;
            }
        };
        let opened = crate::failpoint::hit("restart-freeze")
            .map_err(std::io::Error::other)
            .and_then(|()| Binary::open(&self.command.exe));
        match opened {
            Ok(binary) => {
                tracing::info!(
                    pid = server.pid.as_raw(),
                    "restart: freezing the running server for {}",
                    self.command.exe.display()
                );
                server.send(Tag::Freeze, &[]);
                self.phase = Phase::Restarting {
                    old: server,
                    step: Step::Freezing,
                    binary: Rc::new(binary),
                    since: Instant::now(),
                };
            }
            Err(e) => {
                let pid = server.pid;
                self.phase = Phase::Serving(server);
                self.refusal(pid, 0, format!("opening {}: {e}", self.command.exe.display()));
            }
        }
    }

    /// A restart is done: `new` serves alone, from `binary`.
    pub(super) fn restarted(&mut self, old: Server, new: Server, binary: Rc<Binary>) {
        if let Err(e) = crate::failpoint::hit("restart-sole") {
            // Its death is a crash like any other: a successor recovers.
            tracing::error!("{e}: stopping pid {}", new.pid);
            new.kill(Signal::SIGKILL);
        }
        new.send(Tag::Sole, &[]);
        self.record(
            "restart",
            old.pid.as_raw() as u32,
            &new,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        self.binary = binary;
        self.phase = Phase::Serving(new);
        self.send_history();
    }

    /// A step of a restart or a takeover that takes too long is given up.
    pub(super) fn check_step_limit(&mut self) -> Result<Option<i32>, DaemonError> {
        if let Some(since) = self.peer_left {
            self.peer_left(since)?;
            return Ok(None);
        }
        // As soon as no other server reads (none holds the beside token),
        // or at the latest once their own deadline has passed.
        if self.pending_thaw.is_some_and(|at| {
            Instant::now() >= at || crate::statedir::nobody_beside(&self.command.state_dir, &self.mountpoint)
        }) {
            self.thaw_now(true);
        }
        match &self.phase {
            // Draining, this side waits for the other's own limit first.
            Phase::Joining {
                since,
                step: Handing::Draining,
                ..
            } if since.elapsed() >= 2 * self.step_limit => {
                return self.takeover_too_slow();
            }
            Phase::Joining {
                step: Handing::Draining,
                ..
            } => {}
            Phase::HandingOver { since, .. } | Phase::Joining { since, .. } if since.elapsed() >= self.step_limit => {
                return self.takeover_too_slow();
            }
            Phase::Leaving { since, .. } if since.elapsed() >= self.step_limit => {
                // Stuck: what it holds is resent to the next daemon.
                let Phase::Leaving { old, .. } = std::mem::replace(&mut self.phase, Phase::Moving) else {
                    unreachable!("matched above")
                };
                tracing::error!("leaving for the restart took over {} s", self.step_limit.as_secs_f64());
                old.kill(Signal::SIGKILL);
                self.stop_requested = true;
                self.phase = Phase::HandedOver(Some(old));
                return Ok(None);
            }
            _ => {}
        }
        let Phase::Restarting { since, .. } = &self.phase else {
            return Ok(None);
        };
        if since.elapsed() < self.step_limit {
            return Ok(None);
        }
        let Phase::Restarting { old, step, binary, .. } = std::mem::replace(&mut self.phase, Phase::Moving) else {
            unreachable!("matched above")
        };
        let why = format!(
            "the restart's {} step took over {} s",
            step_name(&step),
            self.step_limit.as_secs_f64()
        );
        tracing::error!("{why}");
        match step {
            // It may still freeze once a re-pin under way ends: thawed, it
            // does not (or thaws again).
            Step::Freezing => self.give_up_restart(old, New::None, false, why),
            Step::Preparing(new) => self.give_up_restart(old, New::Running(&new), false, why),
            Step::Overlap(new) => self.give_up_restart(old, New::Running(&new), true, why),
            Step::Draining(new) => {
                // A thread of the old server stuck in a request: it goes,
                // and what it held goes back in the queue for the new one.
                old.kill(Signal::SIGKILL);
                self.resend();
                self.restarted(old, new, binary);
            }
        }
        Ok(None)
    }

    /// A restart that cannot go on: the new server, if still running,
    /// goes; what it read, if it had begun to read, goes back in the queue
    /// for the old one, which thaws and serves on.
    pub(super) fn give_up_restart(&mut self, old: Server, new: New<'_>, new_read: bool, why: String) {
        let new_pid = match new {
            New::Running(new) => {
                new.kill(Signal::SIGKILL);
                new.pid.as_raw() as u32
            }
            New::Reaped(pid) => pid.as_raw() as u32,
            New::None => 0,
        };
        if new_read {
            self.resend();
        }
        old.send(Tag::Thaw, &[]);
        let old_pid = old.pid;
        self.phase = Phase::Serving(old);
        self.refusal(old_pid, new_pid, why);
    }
}

/// The new server of a restart that is given up.
pub(super) enum New<'a> {
    Running(&'a Server),
    /// Already ended and reaped: its pid may be another process's now.
    Reaped(Pid),
    None,
}

pub(super) fn step_server(step: &Step) -> Option<&Server> {
    match step {
        Step::Freezing => None,
        Step::Preparing(s) | Step::Overlap(s) | Step::Draining(s) => Some(s),
    }
}

pub(super) fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Freezing => "freeze",
        Step::Preparing(_) => "prepare",
        Step::Overlap(_) => "first answer",
        Step::Draining(_) => "drain",
    }
}
