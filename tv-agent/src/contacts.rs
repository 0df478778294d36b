//! The TV's address book: names for user numbers, kept in a JSON file in the agent's
//! data directory so it survives restarts (written and read through [`crate::files`]:
//! atomic replacement, size limit, an unreadable file set aside).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared_proto::UserId;

/// Most contacts one TV keeps.
pub const MAX_CONTACTS: usize = 200;
/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 40;
/// Largest contacts file read at start-up.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The other TV's user number.
    pub user_id: UserId,
    /// What the viewer calls them.
    pub name: String,
}

/// Why a change was refused or could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum ContactError {
    /// Empty name, name too long, or control characters.
    #[error("the name must be 1 to {MAX_NAME_CHARS} characters without control characters")]
    BadName,
    /// User number 0.
    #[error("the user number must be greater than 0")]
    BadUser,
    /// The book is full.
    #[error("the address book is full ({MAX_CONTACTS} contacts)")]
    Full,
    /// No such contact.
    #[error("no contact with number {0}")]
    NotFound(UserId),
    /// The file could not be written; the change was not made.
    #[error("cannot save the address book: {0}")]
    Io(#[from] std::io::Error),
}

/// The address book and its file.
#[derive(Debug)]
pub struct ContactBook {
    /// Where the book is kept.
    path: PathBuf,
    /// Sorted by name (case-insensitively), then number.
    contacts: Vec<Contact>,
}

impl ContactBook {
    /// Opens the book at `path`, creating its directory. A missing file is an empty
    /// book; an unreadable one is renamed to `contacts.json.bad` and the book starts
    /// empty, with a warning.
    pub fn open(path: &Path) -> std::io::Result<ContactBook> {
        let mut contacts: Vec<Contact> = crate::files::read_json(path, MAX_FILE_BYTES)?;
        contacts.retain(|c| c.user_id != 0 && !c.name.trim().is_empty());
        contacts.truncate(MAX_CONTACTS);
        let mut book = ContactBook {
            path: path.to_owned(),
            contacts,
        };
        book.sort();
        Ok(book)
    }

    /// Every contact, sorted by name.
    pub fn list(&self) -> &[Contact] {
        &self.contacts
    }

    /// The name for `user`, if it is in the book.
    pub fn name_of(&self, user: UserId) -> Option<&str> {
        self.contacts
            .iter()
            .find(|c| c.user_id == user)
            .map(|c| c.name.as_str())
    }

    /// Adds a contact, or renames the one with that number; saved before it returns.
    pub fn set(&mut self, user_id: UserId, name: &str) -> Result<(), ContactError> {
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(ContactError::BadName);
        }
        if user_id == 0 {
            return Err(ContactError::BadUser);
        }
        let mut next = self.contacts.clone();
        let full = next.len() >= MAX_CONTACTS;
        match next.iter_mut().find(|c| c.user_id == user_id) {
            Some(c) => c.name = name.to_owned(),
            None if full => return Err(ContactError::Full),
            None => next.push(Contact {
                user_id,
                name: name.to_owned(),
            }),
        }
        self.commit(next)
    }

    /// Removes the contact with number `user_id`; saved before it returns.
    pub fn remove(&mut self, user_id: UserId) -> Result<(), ContactError> {
        let mut next = self.contacts.clone();
        let before = next.len();
        next.retain(|c| c.user_id != user_id);
        if next.len() == before {
            return Err(ContactError::NotFound(user_id));
        }
        self.commit(next)
    }

    /// Writes `next` durably, then makes it the book.
    fn commit(&mut self, mut next: Vec<Contact>) -> Result<(), ContactError> {
        sort(&mut next);
        crate::files::write_json(&self.path, &next)?;
        self.contacts = next;
        Ok(())
    }

    fn sort(&mut self) {
        sort(&mut self.contacts);
    }
}

fn sort(contacts: &mut [Contact]) {
    contacts.sort_by(|a, b| {
        a.name
            .to_lowercase()
            .cmp(&b.name.to_lowercase())
            .then(a.user_id.cmp(&b.user_id))
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn changes_survive_reopening_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tv").join("contacts.json");
        let mut book = ContactBook::open(&path).unwrap();
        book.set(2002, "  Grandma ").unwrap();
        book.set(3003, "anna").unwrap();
        book.set(2002, "Gran").unwrap();
        assert!(matches!(book.set(4004, ""), Err(ContactError::BadName)));
        assert!(matches!(
            book.set(4004, &"x".repeat(MAX_NAME_CHARS + 1)),
            Err(ContactError::BadName)
        ));
        assert!(matches!(book.set(4004, "a\nb"), Err(ContactError::BadName)));
        assert!(matches!(book.set(0, "Zero"), Err(ContactError::BadUser)));
        assert!(matches!(book.remove(9), Err(ContactError::NotFound(9))));
        let again = ContactBook::open(&path).unwrap();
        assert_eq!(
            again.list(),
            &[
                Contact {
                    user_id: 3003,
                    name: "anna".into()
                },
                Contact {
                    user_id: 2002,
                    name: "Gran".into()
                },
            ]
        );
        let mut again = again;
        again.remove(3003).unwrap();
        assert_eq!(ContactBook::open(&path).unwrap().list().len(), 1);
        assert_eq!(again.name_of(2002), Some("Gran"));
    }

    #[test]
    fn a_full_book_refuses_new_numbers_but_renames() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = ContactBook::open(&dir.path().join("c.json")).unwrap();
        for i in 1..=MAX_CONTACTS as u64 {
            book.contacts.push(Contact {
                user_id: i,
                name: format!("n{i}"),
            });
        }
        assert!(matches!(book.set(9999, "new"), Err(ContactError::Full)));
        book.set(1, "renamed").unwrap();
        assert_eq!(book.name_of(1), Some("renamed"));
    }

    #[test]
    fn an_unreadable_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contacts.json");
        std::fs::write(&path, b"{not json").unwrap();
        let book = ContactBook::open(&path).unwrap();
        assert!(book.list().is_empty());
        assert_eq!(
            std::fs::read(dir.path().join("contacts.json.bad")).unwrap(),
            b"{not json"
        );
    }
}
