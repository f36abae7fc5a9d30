//! The files of a re-based DPO reference: `<state_dir>/reference/`.
//!
//! When a phase re-bases the reference on the weights that enter it (the experiment
//! controller, `crate::controller`), those weights must outlive the checkpoint they were
//! saved in (retention deletes old checkpoints) and be found again by a restarted trainer.
//! [`pin`] hard-links the model files of that checkpoint (weights, `config.json`, the
//! tokenizer; not the optimizer or the run state) into `<state_dir>/reference/`, with
//! `PINNED.json` naming the step written last; a copy replaces a link the filesystem
//! refuses. The directory is a model directory: the resident reference loads it like any
//! model, the streamed one reads it layer by layer.
//!
//! Replacement is crash-safe: the new directory is completed under `.tmp-reference`, the old
//! one renamed aside, the new one renamed in, the old one removed. A crash between the two
//! renames leaves no pin; the daemon then pins again from the checkpoint its run state
//! names (`ControllerState::reference_step`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

/// The pinned reference's directory name inside the state directory.
pub const PINNED_DIR: &str = "reference";
/// Written last into the pinned directory: which step's weights these are.
const MARKER: &str = "PINNED.json";
/// Checkpoint files that are run state, not model: never pinned.
const NOT_MODEL: [&str; 5] = [
    "optimizer.bpk",
    "seen.bin",
    "trainer_state.json",
    "state.json",
    "MANIFEST.json",
];

/// `PINNED.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// The step whose weights are pinned.
    step: u64,
}

/// The pinned reference, if one is complete: its step and directory.
pub fn pinned(state_dir: &Path) -> Option<(u64, PathBuf)> {
    let dir = state_dir.join(PINNED_DIR);
    let text = fs::read_to_string(dir.join(MARKER)).ok()?;
    let marker: Marker = serde_json::from_str(&text).ok()?;
    Some((marker.step, dir))
}

/// Pins the model files of `checkpoint` (the directory of step `step`) as the reference;
/// answers the pinned directory. Nothing is left half-written (see the module docs).
pub fn pin(state_dir: &Path, checkpoint: &Path, step: u64) -> io::Result<PathBuf> {
    let dir = state_dir.join(PINNED_DIR);
    let tmp = state_dir.join(format!(".tmp-{PINNED_DIR}"));
    let old = state_dir.join(format!(".old-{PINNED_DIR}"));
    for stale in [&tmp, &old] {
        if stale.exists() {
            fs::remove_dir_all(stale)?;
        }
    }
    durable::create_private_dir(&tmp)?;
    for entry in fs::read_dir(checkpoint)? {
        let entry = entry?;
        let name = entry.file_name();
        if !entry.file_type()?.is_file() || NOT_MODEL.iter().any(|n| name == *n) {
            continue;
        }
        let to = tmp.join(&name);
        if fs::hard_link(entry.path(), &to).is_err() {
            fs::copy(entry.path(), &to)?;
            fs::File::open(&to)?.sync_all()?;
        }
    }
    let marker = serde_json::to_vec(&Marker { step }).map_err(io::Error::other)?;
    durable::write_atomic(&tmp.join(MARKER), &marker)?;
    fs::File::open(&tmp)?.sync_all()?;
    if dir.exists() {
        fs::rename(&dir, &old)?;
    }
    fs::rename(&tmp, &dir)?;
    durable::sync_parent(&dir)?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_links_the_model_files_and_replaces_the_previous_pin() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path();
        assert_eq!(pinned(state), None);
        for (step, weights) in [(4u64, b"four".as_slice()), (9, b"nine")] {
            let ckpt = state.join(format!("step-{step}"));
            fs::create_dir_all(&ckpt).unwrap();
            fs::write(ckpt.join("model.safetensors"), weights).unwrap();
            fs::write(ckpt.join("config.json"), b"{}").unwrap();
            fs::write(ckpt.join("optimizer.bpk"), b"moments").unwrap();
            fs::write(ckpt.join("MANIFEST.json"), b"{}").unwrap();
            let dir = pin(state, &ckpt, step).unwrap();
            assert_eq!(pinned(state), Some((step, dir.clone())));
            assert_eq!(fs::read(dir.join("model.safetensors")).unwrap(), weights);
            assert!(dir.join("config.json").exists());
            assert!(
                !dir.join("optimizer.bpk").exists(),
                "run state is not pinned"
            );
            assert!(!dir.join("MANIFEST.json").exists());
            // The checkpoint may be deleted by retention; the pin keeps its weights.
            fs::remove_dir_all(&ckpt).unwrap();
            assert_eq!(fs::read(dir.join("model.safetensors")).unwrap(), weights);
        }
        let names: Vec<_> = fs::read_dir(state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![PINNED_DIR.to_string()], "no temporary left");
    }
}
