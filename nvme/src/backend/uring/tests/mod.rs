//! Tests of the io_uring back end against the real kernel, on files in the workspace's build
//! directory (a real disk file system, so O_DIRECT is exercised).

mod bounce;
mod cancel;
mod io;
mod open;

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::queue::{Completion, IoCommand};
use crate::spec::Status;

/// A directory on the disk the workspace builds on (`NVMIRROR_TEST_DIR` overrides it).
fn scratch_dir() -> tempfile::TempDir {
    let root = std::env::var_os("NVMIRROR_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../build/test-io")));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

pub(super) fn opts(bytes: u64) -> UringOptions {
    UringOptions {
        create_size: Some(bytes),
        ..UringOptions::default()
    }
}

fn buffered(bytes: u64) -> UringOptions {
    UringOptions {
        buffered: true,
        ..opts(bytes)
    }
}

/// Submits every command, then polls until all have completed; returns statuses by tag.
fn run_all(qp: &mut dyn QueuePair, cmds: &[IoCommand]) -> Vec<Status> {
    for cmd in cmds {
        // SAFETY: every buffer in these tests outlives this call, which reaps everything.
        unsafe { qp.submit(*cmd) }.unwrap();
    }
    let mut got = vec![None; cmds.len()];
    let mut cpl = [Completion::default(); 16];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.iter().any(Option::is_none) {
        assert!(std::time::Instant::now() < deadline, "commands lost");
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            let slot = &mut got[c.tag as usize];
            assert!(slot.is_none(), "tag {} completed twice", c.tag);
            *slot = Some(c.status);
        }
    }
    assert_eq!(qp.outstanding(), 0);
    got.into_iter().map(Option::unwrap).collect()
}
