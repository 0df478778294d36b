//! Fuzz target: the agent's missed-call file (`missed.json` in its data directory), read
//! at power-on by `MissedList::load` (through `tv_agent::files::read_json`). The input is
//! the file's bytes.
//!
//! Invariants beyond "does not panic": loading never fails on content (only I/O errors
//! fail); a file that is valid JSON for the list is kept and gives exactly its newest
//! `MAX_MISSED_KEPT` calls; any other file is set aside as `missed.json.bad`, byte for
//! byte, and the list starts empty; what was loaded saves and loads back unchanged.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tv_agent::agent::missed::{MissedList, MAX_MISSED_KEPT};
use tv_agent::agent::types::{MissedCall, MissedKeeping};
use tv_fuzz::{reset_dir, scratch_dir};

/// `MissedList::save` writes on tokio's blocking pool: one small runtime for the process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("missed");
    reset_dir(&dir);
    let path = dir.join("missed.json");
    std::fs::write(&path, data).expect("writes the input file");
    let keeping = MissedKeeping::File(path.clone());
    let list = MissedList::load(keeping.clone()).expect("content never fails a load");
    let calls = list.calls().to_vec();
    assert!(calls.len() <= MAX_MISSED_KEPT);
    if path.exists() {
        let all: Vec<MissedCall> =
            serde_json::from_slice(data).expect("a kept file is valid JSON for the list");
        let newest = &all[all.len().saturating_sub(MAX_MISSED_KEPT)..];
        assert_eq!(calls, newest, "not the newest calls of the file");
    } else {
        let aside = std::fs::read(dir.join("missed.json.bad")).expect("set aside as .bad");
        assert_eq!(aside, data, "the file set aside is not the file");
        assert!(calls.is_empty());
    }
    // What was loaded is saved and loaded back unchanged.
    runtime()
        .block_on(list.save(calls.clone()))
        .expect("saves the list");
    let again = MissedList::load(keeping).expect("loads what it saved");
    assert_eq!(again.calls(), &calls[..], "save + load changed the list");
});
