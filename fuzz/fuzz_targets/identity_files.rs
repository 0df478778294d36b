//! Fuzz target: the agent's identity files in `<data dir>/identity/` (`enrolled.json`,
//! `tv.key`, `tv.crt`, `server-ca.crt`), read by every mode through
//! `IdentityDir::transport`: the enrollment note (JSON), the TV's key and certificate
//! (`TvKey::from_pem`), and the server's CA (`ca_certs`, then `TlsClient::new`, which
//! parses the certificates into the trust store and checks the TV's key against its
//! certificate).
//!
//! Input layout: the first byte, then the data. Bits 0-2 of the first byte: which file the
//! data is (0 `enrolled.json`, 1 `tv.key`, 2 `tv.crt`, 3 `server-ca.crt`; 4 and above:
//! all four, each a 2-byte big-endian length and its bytes); the other files are a valid
//! identity (`fuzz/fixtures/identity/`). Bit 3: the CA is given on the command line
//! (`--server-ca`) rather than as the saved file. Bit 4: `--user` names the enrolled user
//! (else no `--user`). Bits 5-7: `enrolled.json`, `tv.key`, `tv.crt` are missing (unless
//! they are the data).
//!
//! Invariants beyond "does not panic": `enrolled` gives exactly what serde reads from the
//! file, and a damaged file is an error, never "not enrolled"; a key that reads back
//! survives its own PEM; `transport` succeeds only with an enrollment, a key and a CA file
//! holding a certificate, for the enrolled user; a missing file is "not enrolled", never
//! another error; an enrollment saved again reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tv_agent::identity::{Enrolled, IdentityDir, IdentityError};
use tv_fuzz::{reset_dir, scratch_dir};

/// A valid identity, as the agent writes it (from `examples/gen_corpus.rs`).
const FIXTURES: [&[u8]; 4] = [
    include_bytes!("../fixtures/identity/enrolled.json"),
    include_bytes!("../fixtures/identity/tv.key"),
    include_bytes!("../fixtures/identity/tv.crt"),
    include_bytes!("../fixtures/identity/server-ca.crt"),
];
const NAMES: [&str; 4] = ["enrolled.json", "tv.key", "tv.crt", "server-ca.crt"];

/// The four files' contents (`None`: missing) from the input.
fn files(data: &[u8]) -> Option<(u8, [Option<Vec<u8>>; 4])> {
    let (&mode, rest) = data.split_first()?;
    let which = usize::from(mode & 7);
    let mut files: [Option<Vec<u8>>; 4] = FIXTURES.map(|f| Some(f.to_vec()));
    if which < 4 {
        files[which] = Some(rest.to_vec());
    } else {
        let mut rest = rest;
        for file in &mut files {
            let (n, tail) = match rest {
                [a, b, tail @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), tail),
                _ => (0, &[][..]),
            };
            let n = n.min(tail.len());
            *file = Some(tail[..n].to_vec());
            rest = &tail[n..];
        }
    }
    for (i, file) in files.iter_mut().enumerate().take(3) {
        if mode & (0x20 << i) != 0 && i != which {
            *file = None;
        }
    }
    Some((mode, files))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, files)) = files(data) else {
        return;
    };
    let dir = scratch_dir("identity");
    reset_dir(&dir);
    let id_dir = dir.join("identity");
    std::fs::create_dir_all(&id_dir).expect("creates the identity directory");
    let ca_on_command_line = mode & 8 != 0;
    for (i, (name, body)) in NAMES.iter().zip(&files).enumerate() {
        if let Some(body) = body {
            if i == 3 && ca_on_command_line {
                continue;
            }
            std::fs::write(id_dir.join(name), body).expect("writes the input file");
        }
    }
    let id = IdentityDir::new(&dir);

    // The enrollment note: what serde reads, or an error for a damaged file.
    let enrolled = id.enrolled();
    let parsed = files[0]
        .as_ref()
        .map(|b| serde_json::from_slice::<Enrolled>(b));
    match (&enrolled, &parsed) {
        (Ok(None), None) => {}
        (Ok(Some(e)), Some(Ok(p))) => assert_eq!(e, p),
        (Err(IdentityError::Bad(_)), Some(Err(_))) => {}
        other => panic!("enrolled() disagrees with the file: {other:?}"),
    }

    // The key: survives its own PEM.
    let key = id.key();
    if let Ok(Some(k)) = &key {
        let (cert, pem) = k.to_pem();
        let back = control_client::TvKey::from_pem(cert.as_bytes(), pem.as_bytes())
            .expect("a key reads back from its own PEM");
        assert_eq!(back.cert, k.cert);
    }
    if files[1].is_none() || files[2].is_none() {
        assert!(matches!(key, Ok(None)), "a missing key file: {key:?}");
    }

    let ca_arg = files[3].as_deref().filter(|_| ca_on_command_line);
    let user = match (&enrolled, mode & 0x10 != 0) {
        (Ok(Some(e)), true) => Some(e.user_id),
        (_, true) => Some(1),
        _ => None,
    };
    let result = id.transport(ca_arg, user);
    match &result {
        Ok((_, who)) => {
            let Ok(Some(e)) = &enrolled else {
                panic!("a transport without an enrollment")
            };
            assert_eq!(*who, e.user_id);
            assert!(matches!(key, Ok(Some(_))), "a transport without a key");
            let ca = files[3].as_deref().expect("a transport without a CA");
            assert!(control_client::tls::ca_certs(ca).is_ok());
        }
        Err(IdentityError::NotEnrolled(_)) => {
            let missing = matches!(enrolled, Ok(None))
                || matches!(key, Ok(None))
                || (files[3].is_none() && !ca_on_command_line);
            assert!(missing, "not enrolled, with every file there: {result:?}");
        }
        Err(IdentityError::WrongUser { enrolled: e, asked }) => {
            assert_ne!(e, asked);
        }
        Err(IdentityError::Bad(_)) => {}
    }
    if files.iter().take(3).any(Option::is_none) && enrolled.is_ok() && key.is_ok() {
        assert!(
            !matches!(result, Err(IdentityError::Bad(_))),
            "a missing file is not a damaged one: {result:?}"
        );
    }

    // Saved again, the enrollment reads back the same.
    if let Ok(Some(e)) = &enrolled {
        id.save_enrolled(files[3].as_deref().unwrap_or_default(), e)
            .expect("saves the enrollment");
        assert_eq!(id.enrolled().expect("reads back").as_ref(), Some(e));
    }
});
