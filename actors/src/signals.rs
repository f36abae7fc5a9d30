//! The only place OS signals are read (DESIGN.md §3). Each signal becomes a typed
//! [`Control`] on the channel that `run()` reads at step boundaries:
//!
//! | signal | control |
//! | --- | --- |
//! | SIGTERM, SIGINT | `Shutdown`: finish the step, checkpoint, exit 0; a second SIGINT exits at once (130) |
//! | SIGTSTP | `Pause` at the next step boundary (the handler replaces the default stop, so /metrics keeps answering) |
//! | SIGCONT | `Resume` |
//! | SIGUSR1 | `Checkpoint` now |
//! | SIGHUP | `Reload` the config file's hot settings |

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::Control;

/// Listens for the signals above and forwards them until the receiver is dropped.
/// Must be called inside the tokio runtime; errors only if a handler cannot be installed.
pub fn spawn(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tstp = signal(SignalKind::from_raw(libc::SIGTSTP))?;
    let mut cont = signal(SignalKind::from_raw(libc::SIGCONT))?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut interrupted = false;
        loop {
            // Biased, in this order: when a stop sends SIGTERM then SIGCONT (GNU timeout,
            // systemd) and both are pending, the Shutdown goes first, so the Resume cannot
            // start a step before it is honoured.
            let control = tokio::select! {
                biased;
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => {
                    if interrupted {
                        tracing::warn!("Second SIGINT: exiting at once, without a checkpoint.");
                        std::process::exit(130);
                    }
                    interrupted = true;
                    Control::Shutdown
                }
                _ = tstp.recv() => Control::Pause,
                _ = cont.recv() => Control::Resume,
                _ = usr1.recv() => Control::Checkpoint,
                _ = hup.recv() => Control::Reload,
            };
            tracing::info!(?control, "Signal received.");
            if tx.send(control).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
