//! Where the daemon's log goes. In the foreground: stderr. In the
//! background (`--log-file`): nowhere until the mount is ready, then the
//! file, starting with everything logged before. A daemon that fails to
//! start (refused because another one serves the mount point, or no driver
//! found) reports to the `nvlibfs mount` that started it and leaves no log
//! file behind, and never writes into a running daemon's log.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

enum Target {
    Stderr,
    /// Lines kept until the log file may be opened.
    Pending(Vec<u8>),
    File(File),
}

pub struct Sink {
    target: Mutex<Target>,
    file: Option<PathBuf>,
}

static SINK: std::sync::OnceLock<Sink> = std::sync::OnceLock::new();

/// Logs to stderr, or (with `file`) holds lines until [`open_file`].
/// `-v` for info, `-vv` debug, `-vvv` trace, or any tracing filter in
/// `NVLIBFS_LOG`; fuser's `log` records come along.
pub fn init(verbose: u8, file: Option<&Path>) {
    let sink = SINK.get_or_init(|| Sink {
        target: Mutex::new(match file {
            Some(_) => Target::Pending(Vec::new()),
            None => Target::Stderr,
        }),
        file: file.map(Path::to_owned),
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(nvlibfs::args::log_filter(verbose))
        .with_ansi(file.is_none() && std::io::stderr().is_terminal())
        .with_writer(move || SinkWriter(sink))
        .init();
}

/// The mount is ready: from now on the log goes to the file (if any).
pub fn open_file() -> Result<(), String> {
    let Some(sink) = SINK.get() else { return Ok(()) };
    let Some(path) = &sink.file else { return Ok(()) };
    let opened = open(path);
    let mut target = sink.target.lock().unwrap_or_else(|e| e.into_inner());
    let written = opened.and_then(|mut file| match &*target {
        Target::Pending(lines) => file
            .write_all(lines)
            .map(|()| file)
            .map_err(|e| format!("log file {}: {e}", path.display())),
        _ => Ok(file),
    });
    match written {
        Ok(file) => {
            *target = Target::File(file);
            Ok(())
        }
        Err(e) => {
            // Lines kept for a file that cannot be written would be kept
            // for ever: stderr has them from now on, the error among them.
            *target = Target::Stderr;
            Err(e)
        }
    }
}

fn open(path: &Path) -> Result<File, String> {
    // Not through a symbolic link: whoever could plant one in the log's
    // directory would have the daemon append to a file of their choosing.
    // Not blocking either: a FIFO nobody reads would hold the open for
    // ever, and one read slowly would stall every thread that logs.
    let not_regular = || {
        format!(
            "log file {}: not a regular file (a FIFO or socket would stall the daemon when nobody reads it); \
             name a file with --log-file, or use --foreground to log to stderr",
            path.display()
        )
    };
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("log file {}: a symbolic link; refusing to follow it", path.display()),
        // A FIFO that nobody has open for reading.
        Some(libc::ENXIO) => not_regular(),
        _ => format!("log file {}: {e}", path.display()),
    })?;
    let kind = file
        .metadata()
        .map_err(|e| format!("log file {}: {e}", path.display()))?
        .file_type();
    if !(kind.is_file() || std::os::unix::fs::FileTypeExt::is_char_device(&kind)) {
        return Err(not_regular());
    }
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND))
        .map_err(|e| format!("log file {}: {e}", path.display()))?;
    Ok(file)
}

struct SinkWriter(&'static Sink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.0.target.lock().unwrap_or_else(|e| e.into_inner()) {
            Target::Stderr => std::io::stderr().write(buf),
            Target::Pending(lines) => {
                lines.extend_from_slice(buf);
                Ok(buf.len())
            }
            Target::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
