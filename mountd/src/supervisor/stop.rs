//! SIGTERM and SIGINT in every phase, and the signals passed on.

use super::*;

impl Supervisor {
    pub(super) fn signal(&mut self, signal: Signal) -> Result<Option<i32>, DaemonError> {
        match signal {
            Signal::SIGTERM | Signal::SIGINT => {
                systemd::notify("STOPPING=1");
                match std::mem::replace(&mut self.phase, Phase::Moving) {
                    // Another daemon serves: stopping this one unmounts nothing.
                    Phase::HandedOver(None) => {
                        self.stop_requested = true;
                        return Ok(self.handed_over());
                    }
                    Phase::HandedOver(Some(old)) => {
                        self.stop_requested = true;
                        self.phase = Phase::HandedOver(Some(old));
                        return Ok(None);
                    }
                    // Both servers serve or ours drains: too late to go
                    // back; this daemon goes once it has handed over.
                    Phase::HandingOver {
                        old,
                        peer,
                        step: step @ (Handing::Overlap | Handing::Draining),
                        since,
                    } => {
                        tracing::info!("{signal} while handing over: stopping once the other daemon serves");
                        self.stop_requested = true;
                        self.phase = Phase::HandingOver { old, peer, step, since };
                        return Ok(None);
                    }
                    // Not yet: the takeover is given up, and stopping means
                    // unmounting as ever.
                    Phase::HandingOver { old, peer, .. } => {
                        peer.send(Tag::Refused, format!("the daemon taken over got {signal}").as_bytes());
                        self.give_up_takeover(
                            old,
                            &peer,
                            handover::Other::NeverRead,
                            format!("{signal} before the handover"),
                        );
                    }
                    Phase::Joining { new, peer, .. } => {
                        new.stop();
                        peer.send(Tag::Refused, format!("the daemon taking over got {signal}").as_bytes());
                        return Err(DaemonError::new(format!("{signal} before the takeover was done")));
                    }
                    // A restart, not a stop, and systemd keeps the store
                    // across it: leave the connection to the next daemon.
                    Phase::Serving(server) if self.kept.complete() && systemd::restarting_with_store() => {
                        tracing::info!(
                            "systemd restarts this unit and keeps its fd store: handing the connection to the next \
                             daemon through it, without unmounting"
                        );
                        server.send(Tag::Freeze, &[]);
                        self.phase = Phase::Leaving {
                            old: server,
                            step: Handing::Freezing,
                            since: Instant::now(),
                        };
                        return Ok(None);
                    }
                    Phase::Leaving { old, step, since } => {
                        self.phase = Phase::Leaving { old, step, since };
                        return Ok(None);
                    }
                    other => self.phase = other,
                }
                let (serving, extra) = match std::mem::replace(&mut self.phase, Phase::Moving) {
                    Phase::Mounting(s) | Phase::Serving(s) => (Some(s), None),
                    Phase::Restarting { old, step, .. } => (
                        Some(old),
                        match step {
                            Step::Freezing => None,
                            Step::Preparing(s) | Step::Overlap(s) | Step::Draining(s) => Some(s),
                        },
                    ),
                    Phase::Recovering { new, .. } => (None, Some(new)),
                    Phase::Stopping(s) => (s, None),
                    Phase::HandingOver { .. }
                    | Phase::Joining { .. }
                    | Phase::Leaving { .. }
                    | Phase::HandedOver(_)
                    | Phase::Moving => (None, None),
                };
                // Stopping means unmounting: a server that was not yet
                // the one serving goes at once.
                if let Some(extra) = extra {
                    extra.kill(Signal::SIGKILL);
                    let _ = waitpid(extra.pid, None);
                }
                let Some(server) = serving else { return Ok(Some(0)) };
                server.kill(signal);
                self.phase = Phase::Stopping(Some(server));
            }
            Signal::SIGHUP => {
                if let Phase::Serving(s) = &self.phase {
                    s.kill(Signal::SIGHUP);
                }
            }
            Signal::SIGUSR2 => self.restart(),
            other => tracing::debug!("ignored {other}"),
        }
        Ok(None)
    }
}
