//! Messages (issue 15) against a real server on either backend, through its transfer
//! links, as a TV speaks them: a text and a voice message left for a switched-off TV
//! (the voice message's upload broken half-way and resumed on a new link), announced at
//! its registration, listed newest first, fetched byte for byte, acknowledged and
//! deleted (its body gone from the body directory); a message for an online TV that
//! takes it at once is `delivered`; and every kind of bad input refused with its code,
//! counted, and leaving nothing behind (no row, no partial upload, no body).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::messages::*;
use common::{TestServer, Tv};
use shared_proto::*;

/// `user`'s transfer link.
async fn transfer(srv: &TestServer, user: UserId) -> Tv {
    let mut c = srv.connect(user).await;
    open_transfer(&mut c, user).await;
    c
}

const A: UserId = 1001;
const B: UserId = 2002;

/// The files under the server's body directory (uploads in progress and bodies).
fn body_files(srv: &TestServer) -> Vec<PathBuf> {
    let root = srv
        .shared
        .messages
        .bodies
        .as_ref()
        .unwrap()
        .root()
        .to_path_buf();
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_switched_off_tv_are_kept_resumed_listed_fetched_and_settled() {
    let srv = TestServer::start().await;
    srv.known_offline(B).await;
    srv.known_offline(A).await;
    let voice = fixture("voice.opus");
    assert!(voice.len() > 2 * CHUNK, "the fixture spans chunks");
    let mut a = transfer(&srv, A).await;
    let text = stored(
        a.request(message(B, 1, MessageKind::TEXT, "Call me back ✓", None))
            .await
            .unwrap(),
    );
    // The voice message's upload breaks half-way (the link goes) ...
    let half = voice.len() / 2;
    let req = message(B, 2, MessageKind::VOICE, "from Grandma", Some(&voice));
    assert_eq!(
        a.request(req.clone()).await.unwrap(),
        Reply::UploadFrom { have: 0 }
    );
    put(&mut a, 2, &voice, 0, half).await;
    drop(a);
    // ... and resumes on a new link where it stopped.
    let mut a = transfer(&srv, A).await;
    let Reply::UploadFrom { have } = a.request(req.clone()).await.unwrap() else {
        panic!("the upload should resume")
    };
    assert_eq!(have as usize, half);
    put(&mut a, 2, &voice, half, voice.len()).await;
    let voice_id = stored(a.request(req.clone()).await.unwrap());
    // Sent again (a lost answer): the same message, nothing stored twice.
    assert_eq!(stored(a.request(req).await.unwrap()), voice_id);
    assert_eq!(srv.db.count("SELECT count(*) FROM user_message"), 2);

    // B powers on: told how many wait, on its control link.
    let mut b = srv.tv(B, 4002).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = tokio::time::timeout_at(deadline, b.next_event())
            .await
            .expect("MessagesWaiting after registration")
            .unwrap();
        if ev == (Event::MessagesWaiting { count: 2 }) {
            break;
        }
    }
    let mut bt = transfer(&srv, B).await;
    let waiting = list(&mut bt).await;
    assert_eq!(
        waiting.iter().map(|m| m.message_id).collect::<Vec<_>>(),
        vec![voice_id, text],
        "newest first"
    );
    let v = &waiting[0];
    assert_eq!((v.sender, v.kind), (A, MessageKind::VOICE));
    assert_eq!(v.text, "from Grandma");
    assert_eq!(v.sender_state, NetState::Offline);
    let body = v.body.as_ref().unwrap();
    assert_eq!(body.size, voice.len() as u64);
    assert_eq!(body.sha256, sha256(&voice));
    assert_eq!(body.mime, "audio/ogg");
    assert_eq!(waiting[1].text, "Call me back ✓");
    assert_eq!(waiting[1].body, None);
    assert_eq!(fetch_body(&mut bt, voice_id, body.size).await, voice);
    // Another TV cannot read B's message.
    let mut stranger = transfer(&srv, 3003).await;
    assert_eq!(
        refused(
            stranger
                .request(Request::GetChunk {
                    message_id: voice_id,
                    offset: 0,
                    len: 10
                })
                .await
        ),
        ErrorCode::NO_SUCH_MESSAGE
    );
    // Acknowledged: no longer listed; kept until deleted.
    assert_eq!(
        bt.request(Request::AckMessages {
            message_ids: vec![voice_id, text]
        })
        .await
        .unwrap(),
        Reply::Acked { count: 2 }
    );
    assert!(list(&mut bt).await.is_empty());
    assert_eq!(
        body_files(&srv).len(),
        1,
        "the voice message's body is kept"
    );
    assert_eq!(
        bt.request(Request::DeleteMessages {
            message_ids: vec![voice_id]
        })
        .await
        .unwrap(),
        Reply::Deleted { count: 1 }
    );
    assert!(body_files(&srv).is_empty(), "deleted with its body");
    assert_eq!(srv.db.count("SELECT count(*) FROM user_message"), 1);
    assert!(srv
        .shared
        .metrics
        .encode(&[])
        .contains("call_proxy_messages_stored_total{kind=\"voice\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_an_online_tv_takes_at_once_is_delivered() {
    let srv = TestServer::start().await;
    srv.known_offline(A).await;
    let mut b = srv.tv(B, 4002).await;
    let mut a = transfer(&srv, A).await;
    let send = tokio::spawn(async move {
        a.request(message(B, 7, MessageKind::TEXT, "on now?", None))
            .await
            .unwrap()
    });
    // B's TV hears of it, takes it and acknowledges it, as an agent does.
    let ev = tokio::time::timeout(Duration::from_secs(5), b.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev, Event::MessagesWaiting { count: 1 });
    let mut bt = transfer(&srv, B).await;
    let waiting = list(&mut bt).await;
    assert_eq!(waiting.len(), 1);
    bt.request(Request::AckMessages {
        message_ids: vec![waiting[0].message_id],
    })
    .await
    .unwrap();
    match send.await.unwrap() {
        Reply::MessageSent(s) => {
            assert_eq!(s.outcome, SendOutcome::DELIVERED);
            assert_eq!(s.message_id, waiting[0].message_id);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_refused_counted_and_leave_nothing_behind() {
    let srv = TestServer::start_with(|c| c.mailbox_messages = 2).await;
    srv.known_offline(B).await;
    srv.known_offline(A).await;
    let mut a = transfer(&srv, A).await;
    // Text over the limit (5,000 characters, the limit is 2,000).
    let long = "x".repeat(5_000);
    assert_eq!(
        refused(
            a.request(message(B, 1, MessageKind::TEXT, &long, None))
                .await
        ),
        ErrorCode::TOO_LARGE
    );
    // An unknown recipient.
    assert_eq!(
        refused(
            a.request(message(99, 2, MessageKind::TEXT, "hi", None))
                .await
        ),
        ErrorCode::UNKNOWN_USER
    );
    // Chunks for nothing announced.
    assert_eq!(
        refused(
            a.request(Request::PutChunk {
                key: 3,
                offset: 0,
                bytes: vec![1; 10]
            })
            .await
        ),
        ErrorCode::NO_SUCH_MESSAGE
    );
    // A wrong hash: announced as one body, another sent.
    let picture = fixture("picture.png");
    let mut other = picture.clone();
    other[picture.len() / 2] ^= 0xff;
    let req = message(B, 4, MessageKind::PICTURE, "", Some(&picture));
    assert_eq!(
        a.request(req.clone()).await.unwrap(),
        Reply::UploadFrom { have: 0 }
    );
    put(&mut a, 4, &other, 0, other.len()).await;
    assert_eq!(refused(a.request(req.clone()).await), ErrorCode::BAD_HASH);
    // Truncated: the finishing send only asks for the rest; nothing is stored.
    let req = message(B, 5, MessageKind::PICTURE, "", Some(&picture));
    a.request(req.clone()).await.unwrap();
    put(&mut a, 5, &picture, 0, picture.len() / 2).await;
    assert_eq!(
        a.request(req.clone()).await.unwrap(),
        Reply::UploadFrom {
            have: (picture.len() / 2) as u64
        }
    );
    // More bytes than announced.
    assert_eq!(
        refused(
            a.request(Request::PutChunk {
                key: 5,
                offset: (picture.len() / 2) as u64,
                bytes: vec![0; picture.len()]
            })
            .await
        ),
        ErrorCode::BAD_HASH
    );
    // Not a JPEG.
    let mut bad_jpeg = vec![0xff, 0xd8, 0xff, 0xe0];
    bad_jpeg.extend(std::iter::repeat_n(0x41, 5_000));
    assert_eq!(
        refused(send_body(&mut a, B, 6, MessageKind::PICTURE, &bad_jpeg).await),
        ErrorCode::BAD_MEDIA
    );
    // A PNG bomb: a tiny file declaring 100000 x 100000 pixels.
    assert_eq!(
        refused(send_body(&mut a, B, 7, MessageKind::PICTURE, &png_bomb()).await),
        ErrorCode::BAD_MEDIA
    );
    // A voice message that is a picture.
    assert_eq!(
        refused(send_body(&mut a, B, 8, MessageKind::VOICE, &picture).await),
        ErrorCode::BAD_MEDIA
    );
    // The mailbox holds two: the third is refused, before its body is sent.
    stored(
        a.request(message(B, 9, MessageKind::TEXT, "one", None))
            .await
            .unwrap(),
    );
    stored(
        send_body(&mut a, B, 10, MessageKind::PICTURE, &picture)
            .await
            .unwrap(),
    );
    assert_eq!(
        refused(
            a.request(message(B, 11, MessageKind::PICTURE, "", Some(&picture)))
                .await
        ),
        ErrorCode::QUOTA_EXCEEDED
    );
    // Nothing half-stored: two rows, one body, and only the truncated upload's partial
    // file (its sender may still finish it) — discarded uploads are gone.
    assert_eq!(srv.db.count("SELECT count(*) FROM user_message"), 2);
    let files = body_files(&srv);
    let sealed: Vec<_> = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/store/"))
        .collect();
    let partial: Vec<_> = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/partial/"))
        .collect();
    assert_eq!(sealed.len(), 1, "{files:?}");
    assert!(
        partial.is_empty(),
        "the over-long upload was discarded: {files:?}"
    );
    let m = &srv.shared.metrics;
    assert_eq!(m.messages_refused_by("too_large"), 1);
    assert_eq!(m.messages_refused_by("bad_hash"), 2);
    assert_eq!(m.messages_refused_by("bad_media"), 3);
    assert_eq!(m.messages_refused_by("quota_exceeded"), 1);
    assert_eq!(m.messages_refused_by("unknown_user"), 1);
}

/// A PNG whose header declares 100000 x 100000 pixels, with valid chunk CRCs.
fn png_bomb() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
