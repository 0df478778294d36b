//! Fuzz target: the agent's address book file (`contacts.json` in its data directory),
//! read at start-up by `ContactBook::open` (through `tv_agent::files::read_json`). The
//! input is the file's bytes.
//!
//! Invariants beyond "does not panic": opening never fails on content; the book holds at
//! most `MAX_CONTACTS` entries, none with number 0 or a blank name, sorted by name
//! (case-insensitively) then number, each found by `name_of`; a file that is not valid
//! JSON for the book is set aside as `contacts.json.bad`, byte for byte, and the book
//! starts empty; after a change (a new contact, or removing one) the book reopens equal
//! to what it was in memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tv_agent::contacts::{Contact, ContactBook, ContactError, MAX_CONTACTS};
use tv_fuzz::{reset_dir, scratch_dir};

fn in_order(a: &Contact, b: &Contact) -> bool {
    (a.name.to_lowercase(), a.user_id) <= (b.name.to_lowercase(), b.user_id)
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("contacts");
    reset_dir(&dir);
    let path = dir.join("contacts.json");
    std::fs::write(&path, data).expect("writes the input file");
    let mut book = ContactBook::open(&path).expect("content never fails an open");
    let list = book.list();
    assert!(list.len() <= MAX_CONTACTS);
    for c in list {
        assert_ne!(c.user_id, 0);
        assert!(!c.name.trim().is_empty());
        assert!(book.name_of(c.user_id).is_some());
    }
    assert!(
        list.windows(2).all(|w| in_order(&w[0], &w[1])),
        "not sorted by name, then number"
    );
    if path.exists() {
        let all: Vec<Contact> =
            serde_json::from_slice(data).expect("a kept file is valid JSON for the book");
        assert!(list.len() <= all.len());
    } else {
        let aside = std::fs::read(dir.join("contacts.json.bad")).expect("set aside as .bad");
        assert_eq!(aside, data, "the file set aside is not the file");
        assert!(list.is_empty());
    }

    // A change is saved; the book reopens as it is in memory.
    let first = list.first().map(|c| c.user_id);
    match book.set(u64::MAX, "Fuzz") {
        Ok(()) => assert_eq!(book.name_of(u64::MAX), Some("Fuzz")),
        Err(ContactError::Full) => assert_eq!(book.list().len(), MAX_CONTACTS),
        Err(e) => panic!("a valid contact was refused: {e}"),
    }
    assert_eq!(
        ContactBook::open(&path).expect("reopens").list(),
        book.list(),
        "set + reopen changed the book"
    );
    if let Some(user) = first.filter(|&u| u != u64::MAX) {
        book.remove(user).expect("removes a listed contact");
        assert!(book.name_of(user).is_none());
        assert_eq!(
            ContactBook::open(&path).expect("reopens").list(),
            book.list(),
            "remove + reopen changed the book"
        );
    }
});
