//! A server that ends: which phase it ends in decides what follows, and a
//! crash is recovered by a successor from the last acknowledged checkpoint.

use super::*;

impl Supervisor {
    /// A server process ended.
    pub(super) fn exit(&mut self, pid: Pid, status: WaitStatus) -> Result<Option<i32>, DaemonError> {
        let code = match status {
            WaitStatus::Exited(_, code) => code,
            _ => 128 + 9,
        };
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            // Never got going (it told `nvlibfs mount` why), or stopped.
            Phase::Mounting(s) if s.pid == pid => return Ok(Some(code)),
            Phase::Stopping(Some(s)) if s.pid == pid => return Ok(Some(code)),
            Phase::Serving(s) if s.pid == pid => {
                if code == 0 && matches!(status, WaitStatus::Exited(..)) {
                    // Unmounted from outside, or the connection aborted
                    // under a mount that is still there.
                    let live = self.mountpoint.join(nvlibfs::control::LIVE_DIR);
                    if nvlibfs::mountinfo::at(&live).is_some_and(|m| nvlibfs::mountinfo::is_nvlibfs_fuse(&m)) {
                        self.check_connection()?;
                    }
                    return Ok(Some(0));
                }
                tracing::error!("the server (pid {pid}) died: {status:?}; starting another to take over");
                if s.serving_since.is_none_or(|t| t.elapsed() < EARLY_DEATH) {
                    self.crashes.push_back(Instant::now());
                }
                self.recover("crash", pid)?;
            }
            Phase::Restarting { old, step, binary, .. } if old.pid == pid => match step {
                // It died before its final checkpoint was kept: the last
                // acknowledged one is what there is, for the binary that
                // wrote it.
                Step::Freezing => {
                    tracing::error!("the server (pid {pid}) died during a restart, before it froze: {status:?}");
                    self.crashes.push_back(Instant::now());
                    self.recover("crash", pid)?;
                }
                // The new server has the final checkpoint: it goes on as a
                // crash's successor (resent requests, alone).
                Step::Preparing(new) => {
                    tracing::error!("the old server (pid {pid}) died while the new one prepared: {status:?}");
                    self.phase = Phase::Recovering {
                        new,
                        reason: "crash",
                        old_pid: pid.as_raw() as u32,
                        since: (Instant::now(), SystemTime::now()),
                    };
                }
                Step::Overlap(new) | Step::Draining(new) => {
                    if !(code == 0 && matches!(status, WaitStatus::Exited(..))) {
                        tracing::error!("the old server (pid {pid}) died while the new one served: {status:?}");
                        self.resend();
                    }
                    self.restarted(old, new, binary);
                }
            },
            Phase::Restarting {
                old,
                step: step @ (Step::Preparing(_) | Step::Overlap(_)),
                ..
            } if step_server(&step).is_some_and(|s| s.pid == pid) => {
                tracing::error!("the new server (pid {pid}) ended during the restart: {status:?}");
                // Reaped: nothing to stop; what it read, if it read,
                // goes back in the queue for the old one.
                let read = matches!(step, Step::Overlap(_));
                let why = format!("it ended before it served: {status:?}");
                self.give_up_restart(old, New::Reaped(pid), read, why);
            }
            // The old server has stopped reading: this is a crash.
            Phase::Restarting {
                step: Step::Draining(new),
                ..
            } if new.pid == pid => {
                tracing::error!("the new server (pid {pid}) died while the old one drained: {status:?}");
                self.crashes.push_back(Instant::now());
                self.recover("crash", pid)?;
            }
            Phase::HandedOver(Some(s)) if s.pid == pid => return Ok(self.handed_over()),
            // The store holds the last acknowledged checkpoint: the next
            // daemon recovers from it as after any crash.
            Phase::Leaving { old, .. } if old.pid == pid => {
                tracing::error!("the server (pid {pid}) died while leaving for the restart: {status:?}");
                self.stop_requested = true;
                return Ok(self.handed_over());
            }
            Phase::HandingOver { old, peer, step, .. } if old.pid == pid => match step {
                // Before the other daemon's server read anything: a crash
                // like any other, and the takeover ends with it.
                Handing::Freezing | Handing::Preparing => {
                    tracing::error!("the server (pid {pid}) died while handing over: {status:?}");
                    peer.send(Tag::Refused, b"the server taken over died");
                    self.crashes.push_back(Instant::now());
                    self.recover("crash", pid)?;
                }
                Handing::Overlap | Handing::Draining => {
                    if !(code == 0 && matches!(status, WaitStatus::Exited(..))) {
                        tracing::error!("our server (pid {pid}) died while the other daemon's served: {status:?}");
                        self.resend();
                    }
                    self.drained_for(old, &peer)?;
                    if let Phase::HandedOver(Some(_)) = self.phase {
                        self.phase = Phase::HandedOver(None);
                        return Ok(self.handed_over());
                    }
                }
            },
            // The other daemon was told to drain its server: there is no
            // going back. Once it has, a successor of ours recovers.
            Phase::Joining {
                new,
                peer,
                step: Handing::Draining,
                since,
            } if new.pid == pid => {
                tracing::error!(
                    "this daemon's server (pid {pid}) died while the other daemon's drained: {status:?}; a \
                     successor serves once that is done"
                );
                self.join_server_died = Some(pid);
                self.phase = Phase::Joining {
                    new,
                    peer,
                    step: Handing::Draining,
                    since,
                };
            }
            Phase::Joining { new, peer, .. } if new.pid == pid => {
                let why = format!("this daemon's new server (pid {pid}) ended: {status:?}");
                // If it had begun to read, the other daemon resends.
                peer.send(Tag::Refused, why.as_bytes());
                return Err(DaemonError::new(format!("--take-over failed: {why}")));
            }
            Phase::Recovering {
                new,
                reason,
                old_pid,
                since,
            } if new.pid == pid => {
                tracing::error!("the new server (pid {pid}) ended before it was ready: {status:?}");
                self.crashes.push_back(Instant::now());
                self.recover(reason, Pid::from_raw(old_pid as i32))?;
                if let Phase::Recovering { since: s, .. } = &mut self.phase {
                    *s = since;
                }
            }
            other => {
                tracing::debug!("pid {pid} ended: {status:?}");
                self.phase = other;
            }
        }
        Ok(None)
    }

    /// The server died: a successor from the binary that wrote the
    /// checkpoint, unless servers keep dying at once.
    /// A connection the kernel ended cannot be served again: say so and
    /// end, rather than start servers that cannot answer.
    pub(super) fn check_connection(&self) -> Result<(), DaemonError> {
        if !self.kept.connection_aborted() {
            return Ok(());
        }
        Err(DaemonError::new(format!(
            "the kernel ended the FUSE connection of {} (aborted through /sys/fs/fuse/connections, or the mount \
             was forced away): no server can answer on it again; `nvlibfs umount {0}` and `nvlibfs mount {0}` \
             start afresh (containers bound with rslave see the new mount)",
            self.mountpoint.display()
        )))
    }

    pub(super) fn recover(&mut self, reason: &'static str, old: Pid) -> Result<(), DaemonError> {
        self.check_connection()?;
        while self.crashes.front().is_some_and(|t| t.elapsed() > CRASH_WINDOW) {
            self.crashes.pop_front();
        }
        if self.crashes.len() > MAX_CRASHES {
            return Err(DaemonError::new(format!(
                "the server died {} times within {} s; giving up (the mount ends with this process)",
                self.crashes.len(),
                CRASH_WINDOW.as_secs()
            )));
        }
        let new = self.start_successor(&self.binary.clone())?;
        self.phase = Phase::Recovering {
            new,
            reason,
            old_pid: old.as_raw() as u32,
            since: (Instant::now(), SystemTime::now()),
        };
        Ok(())
    }

    /// FUSE_NOTIFY_RESEND: every request a server read and did not answer
    /// goes back in the queue.
    pub(super) fn resend(&self) {
        let Some(connection) = &self.kept.connection else {
            return;
        };
        let init: Option<InitRecord> = serde_json::from_slice(&connection.body).ok();
        let Some(init) = init.filter(|_| !self.command.no_resend) else {
            return tracing::warn!(
                "requests the server had read and not answered cannot be resent (--no-resend): they wait until \
                 their callers are killed"
            );
        };
        match takeover::resend(&connection.fds[0], &init) {
            Ok(true) => tracing::info!("asked the kernel to resend what the server had not answered"),
            Ok(false) => tracing::warn!(
                "this kernel cannot resend requests a dead server had read (FUSE_NOTIFY_RESEND is Linux 6.9+): \
                 they wait until their callers are killed"
            ),
            Err(e) => tracing::error!("FUSE_NOTIFY_RESEND: {e}"),
        }
    }
}
