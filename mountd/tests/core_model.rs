//! The serving core against a model of the kernel, without FUSE: several
//! threads play the kernel, each looking names up, listing directories
//! (READDIRPLUS counts like lookups), opening, reading, releasing and
//! forgetting in random interleavings while generations are installed.
//! Each thread keeps what it holds, as the kernel would; after every step
//! every inode it holds must still resolve to the generation it was given
//! (never freed, never reused), and at every pause, with no request in
//! flight, exactly the current generation and those the kernel still holds
//! must be live.
//!
//! Installs follow the daemon's protocol with its supervisor (stage,
//! checkpoint, commit, checkpoint), and at pauses a new server sometimes
//! takes over from the last checkpoint "sent", at times one taken with a
//! generation staged but never committed (the server died in between):
//! everything the kernel holds must resolve in the new server too.

use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs::view::{NodeType, View};
use nvlibfs_fixture::{build, FixtureSpec, Rng};
use nvlibfs_mountd::kept::{Kept, Taken};
use nvlibfs_mountd::link::Link;
use nvlibfs_mountd::protocol::{self, Tag};
use nvlibfs_mountd::served::{Opened, Served, FUSE_ROOT};
use nvlibfs_mountd::takeover::InitRecord;
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

const THREADS: usize = 4;
const ROUNDS: usize = 40;
const STEPS: usize = 150;
/// Installs wait while this many generations live, so open files stay
/// well inside the descriptor limit.
const MAX_LIVE: usize = 12;

/// What one kernel thread holds of an inode.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    lookups: u64,
    opens: u64,
    generation: u64,
    node_type: Option<NodeType>,
}

type Holdings = HashMap<u64, Held>;

/// What a kernel's FUSE_INIT would have said.
const INIT: InitRecord = InitRecord {
    major: 7,
    minor: 41,
    max_readahead: 131072,
    flags: 0,
};

/// The supervisor, played through the real protocol: the server's
/// checkpoints cross a real socket pair to the supervisor's `Kept`, which
/// answers them; a takeover replays what it kept over another socket pair
/// to a new server, which restores from what it receives. Its lock also
/// stands for the daemon's one re-pin thread: one install at a time.
struct Supervisor {
    link: Mutex<Link>,
    kept: Arc<Mutex<Kept>>,
}

/// The supervisor's reader: answers each checkpoint as it arrives.
fn answer(sock: OwnedFd, kept: Arc<Mutex<Kept>>) {
    std::thread::spawn(move || {
        while let Ok(Some(m)) = protocol::recv(&sock) {
            if let Taken::Answer(a) = kept.lock().unwrap().take(m).expect("a protocol message") {
                protocol::send_message(&sock, &a).unwrap();
            }
        }
    });
}

impl Supervisor {
    /// The first server's connection and first checkpoint.
    fn new(served: &Served) -> Supervisor {
        let (server, ours) = protocol::pair().unwrap();
        let kept = Arc::new(Mutex::new(Kept::default()));
        answer(ours, kept.clone());
        let link = Link::new(server);
        let init = serde_json::to_vec(&INIT).unwrap();
        let dev = std::fs::File::open("/dev/null").unwrap();
        link.send(Tag::Connection, &init, &[dev.as_fd()]).unwrap();
        link.checkpoint(served).expect("the first checkpoint");
        Supervisor {
            link: Mutex::new(link),
            kept,
        }
    }

    fn keep(&self, link: &Link, served: &Served) {
        link.checkpoint(served).expect("checkpoint");
    }

    /// As repin.rs does it; `dies` after the commit, before its second
    /// checkpoint.
    fn install(&self, served: &Served, view: View, dies: bool) {
        let link = self.link.lock().unwrap();
        let mut sent = 0;
        served
            .swap_in(view, None, |served| {
                sent += 1;
                if sent == 1 || !dies {
                    link.checkpoint(served)
                } else {
                    Ok(())
                }
            })
            .expect("checkpoint");
    }

    /// A new server from the newest checkpoint the supervisor kept, as it
    /// crosses the socket.
    fn take_over(&self) -> Served {
        let (theirs, ours) = protocol::pair().unwrap();
        self.kept.lock().unwrap().replay(&ours).expect("replay");
        let link = Link::new(theirs);
        let received = nvlibfs_mountd::link::receive(&link).expect("receive");
        let generations = received.checkpoint.generations.iter().map(|g| g.number).collect();
        let served = Served::restore(
            "/model".into(),
            false,
            received.checkpoint,
            received.files,
            received.counts,
            received.spec,
            Arc::new(nvlibfs_mountd::backing::Connection(received.fuse)),
        )
        .expect("restore");
        served.own_backing(false);
        link.continue_from(received.seq, generations);
        answer(ours, self.kept.clone());
        *self.link.lock().unwrap() = link;
        served
    }
}

fn view_of(root: &Path, version: &str) -> View {
    nvlibfs::plan(root, &PinRequest::Version(version.into()), &KernelInfo::running())
        .expect("plan")
        .view
}

/// One random kernel action; returns a description for failure messages.
fn step(
    served: &Served,
    supervisor: &Supervisor,
    rng: &mut Rng,
    held: &mut Holdings,
    new_view: &dyn Fn() -> View,
) -> String {
    let dirs: Vec<u64> = held
        .iter()
        .filter(|(_, h)| h.lookups > 0 && h.node_type == Some(NodeType::Dir))
        .map(|(&i, _)| i)
        .collect();
    let looked_up: Vec<u64> = held.iter().filter(|(_, h)| h.lookups > 0).map(|(&i, _)| i).collect();
    let files: Vec<u64> = held
        .iter()
        .filter(|(_, h)| h.lookups > 0 && h.node_type == Some(NodeType::File))
        .map(|(&i, _)| i)
        .collect();
    let open: Vec<u64> = held.iter().filter(|(_, h)| h.opens > 0).map(|(&i, _)| i).collect();
    let parent = if rng.below(3) == 0 {
        FUSE_ROOT
    } else {
        rng.pick(&dirs).unwrap_or(FUSE_ROOT)
    };
    match rng.below(100) {
        0..=29 => {
            let mut names = Vec::new();
            let _ = served.readdir(parent, 2, false, |e| {
                names.push(e.name.clone());
                false
            });
            let Some(i) = rng.pick(&(0..names.len()).collect::<Vec<_>>()) else {
                return format!("lookup in empty {parent}");
            };
            match served.lookup(parent, &names[i]) {
                Ok(Some(entry)) => {
                    let h = held.entry(entry.attr.ino).or_default();
                    h.lookups += 1;
                    h.generation = entry.generation;
                    h.node_type = Some(entry.attr.node_type);
                    format!("lookup {parent}/{:?} -> {}", names[i], entry.attr.ino)
                }
                other => panic!("lookup of a listed name {parent}/{:?} gave {other:?}", names[i]),
            }
        }
        30..=39 => {
            // A reply buffer that fills after a random number of entries.
            let room = rng.below(8) as usize;
            let mut added = Vec::new();
            served
                .readdir(parent, rng.below(3), true, |e| {
                    if added.len() >= room {
                        return true;
                    }
                    added.push(e.clone());
                    false
                })
                .unwrap_or_else(|e| panic!("readdirplus of held dir {parent}: errno {e}"));
            for e in added.iter().filter(|e| e.name != "." && e.name != "..") {
                let h = held.entry(e.entry.attr.ino).or_default();
                h.lookups += 1;
                h.generation = e.entry.generation;
                h.node_type = Some(e.entry.attr.node_type);
            }
            format!("readdirplus {parent}: {} entries", added.len())
        }
        40..=54 => {
            let Some(ino) = rng.pick(&files) else {
                return "no file to open".into();
            };
            let opened = served
                .open(ino, libc::O_RDONLY)
                .unwrap_or_else(|e| panic!("open {ino}: errno {e}"));
            assert!(matches!(opened, Opened::Handle { fh, .. } if fh == ino), "{opened:?}");
            held.get_mut(&ino).unwrap().opens += 1;
            let mut buf = [0u8; 64];
            served
                .read(ino, 0, &mut buf)
                .unwrap_or_else(|e| panic!("read {ino}: errno {e}"));
            format!("open {ino}")
        }
        55..=69 => {
            let Some(ino) = rng.pick(&open) else {
                return "nothing to release".into();
            };
            // The kernel lets go first, then tells the server.
            held.get_mut(&ino).unwrap().opens -= 1;
            served.release(ino);
            format!("release {ino}")
        }
        70..=96 => {
            let Some(ino) = rng.pick(&looked_up) else {
                return "nothing to forget".into();
            };
            let h = held.get_mut(&ino).unwrap();
            let n = 1 + rng.below(h.lookups);
            h.lookups -= n;
            served.forget(ino, n);
            format!("forget {ino} x{n}")
        }
        _ if served.live_generations().len() < MAX_LIVE => {
            supervisor.install(served, new_view(), false);
            "install".into()
        }
        _ => {
            // Memory pressure: the kernel evicts what it holds of older
            // generations (each live one holds its files open).
            let current = served.current().unwrap().number as u64;
            for (&ino, h) in held.iter_mut().filter(|(_, h)| h.generation != current) {
                for _ in 0..std::mem::take(&mut h.opens) {
                    served.release(ino);
                }
                served.forget(ino, std::mem::take(&mut h.lookups));
            }
            "evict".into()
        }
    }
}

/// Every inode held must resolve to the generation it came from.
fn check_held(served: &Served, held: &mut Holdings, last: &str) {
    held.retain(|_, h| h.lookups > 0 || h.opens > 0);
    for (&ino, h) in held.iter() {
        match served.getattr(ino) {
            Ok(entry) => assert_eq!(
                entry.generation, h.generation,
                "after `{last}`: inode {ino} held by the kernel now belongs to generation {} (was {})",
                entry.generation, h.generation
            ),
            Err(e) => panic!(
                "after `{last}`: inode {ino} held by the kernel (gen {}) is gone: errno {e}",
                h.generation
            ),
        }
    }
}

/// The two tests hold many descriptors each: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every live generation holds its files open, as the daemon's do: take
/// the hard limit, as the daemon does.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn run(seed: u64, root: &Path, version: &str) {
    raise_file_limit();
    let mut served = Arc::new(Served::new("/model".into(), false).unwrap());
    served.start(view_of(root, version), None);
    *served.init_record.lock().unwrap() = Some(INIT);
    let supervisor = Arc::new(Supervisor::new(&served));
    let mut holdings: Vec<Holdings> = vec![Holdings::new(); THREADS];
    let mut rngs: Vec<Rng> = (0..THREADS as u64)
        .map(|t| Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(t + 1) | 1))
        .collect();
    // Each round runs the kernel threads to a pause (joined, so a failed
    // check ends the test instead of leaving the others waiting), then
    // looks at the whole with no request in flight.
    for round in 0..ROUNDS {
        let threads: Vec<_> = holdings
            .drain(..)
            .zip(rngs.drain(..))
            .map(|(mut held, mut rng)| {
                let served = served.clone();
                let supervisor = supervisor.clone();
                let (root, version) = (root.to_owned(), version.to_owned());
                std::thread::spawn(move || {
                    let new_view = || view_of(&root, &version);
                    for _ in 0..STEPS {
                        let last = step(&served, &supervisor, &mut rng, &mut held, &new_view);
                        check_held(&served, &mut held, &last);
                    }
                    (held, rng)
                })
            })
            .collect();
        for t in threads {
            let (held, rng) = t
                .join()
                .unwrap_or_else(|_| panic!("seed {seed}, round {round}: a kernel thread failed"));
            holdings.push(held);
            rngs.push(rng);
        }
        let takeover = match rngs[0].below(5) {
            0 => Some("a takeover"),
            1 => {
                // Died between stage and commit: the checkpoint has a
                // generation nothing reached.
                let link = supervisor.link.lock().unwrap();
                let _staged = served.stage(view_of(root, version), None).expect("stage");
                supervisor.keep(&link, &served);
                Some("a takeover from a staged generation")
            }
            2 => {
                // Died after the commit, before its checkpoint, with the
                // kernel already holding a name of the new generation.
                supervisor.install(&served, view_of(root, version), true);
                let lib64 = served.lookup(FUSE_ROOT, "lib64".as_ref()).unwrap().expect("lib64");
                let h = holdings[0].entry(lib64.attr.ino).or_default();
                h.lookups += 1;
                h.generation = lib64.generation;
                h.node_type = Some(lib64.attr.node_type);
                Some("a takeover right after a commit")
            }
            _ => None,
        };
        if let Some(what) = takeover {
            served = Arc::new(supervisor.take_over());
            for held in &mut holdings {
                check_held(&served, held, what);
            }
        }
        let mut expected: BTreeSet<u32> = holdings
            .iter()
            .flat_map(|h| h.values().map(|h| h.generation as u32))
            .collect();
        expected.insert(served.current().unwrap().number);
        let live: BTreeSet<u32> = served.live_generations().into_iter().collect();
        assert_eq!(
            live, expected,
            "seed {seed}, round {round}: live generations vs. the current one plus those the kernel holds"
        );
    }
    // The kernel lets go of everything, as at unmount.
    for held in holdings {
        for (ino, h) in held {
            for _ in 0..h.opens {
                served.release(ino);
            }
            if h.lookups > 0 {
                served.forget(ino, h.lookups);
            }
        }
    }
    let current = served.current().unwrap().number;
    assert_eq!(served.live_generations(), vec![current], "seed {seed}: all let go");
    let status = served.status();
    assert_eq!(status.generations.len(), 1);
    assert_eq!(status.generations[0].kernel_refs, 0, "seed {seed}: counts back to zero");
}

/// The fixture driver is built with a C compiler and ldconfig.
fn fixture(root: &Path) -> FixtureSpec {
    let spec = FixtureSpec::new("580.159.04");
    build(&spec, root).unwrap_or_else(|e| {
        panic!("building the fixture driver failed ({e}): it needs cc, libc6-dev and ldconfig; run contrib/test.sh")
    });
    spec
}

#[test]
fn generations_are_freed_exactly_when_the_kernel_lets_go() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let spec = fixture(&root);
    for seed in [1, 2, 3] {
        run(seed, &root, &spec.version);
    }
}

/// A thousand re-pins with the kernel holding an inode of every
/// hundredth generation: every inode number stays below 2^32 and none is
/// reused while held.
#[test]
fn inode_numbers_fit_32_bits_and_are_never_reused_while_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let spec = fixture(&root);
    raise_file_limit();
    let served = Served::new("/model".into(), false).unwrap();
    served.start(view_of(&root, &spec.version), None);
    let mut held: Vec<(u64, u64)> = Vec::new();
    for n in 0..1000 {
        let lib64 = served.lookup(FUSE_ROOT, "lib64".as_ref()).unwrap().unwrap();
        assert!(lib64.attr.ino < 1 << 32);
        if n % 100 == 0 {
            held.push((lib64.attr.ino, lib64.generation));
        } else {
            served.forget(lib64.attr.ino, 1);
        }
        served.install(view_of(&root, &spec.version), None);
        for &(ino, generation) in &held {
            assert_eq!(served.getattr(ino).unwrap().generation, generation);
        }
    }
    assert_eq!(served.live_generations().len(), held.len() + 1);
}
