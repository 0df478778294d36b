//! Fetching every cached call page by page, and acknowledging in pages.
//!
//! [`CachedPager`] is the paging rule with no I/O (which request comes next, what a
//! reply means); [`fetch_all_cached`] runs it over any request function, so the agent's
//! link and [`crate::Client`] share it.

use std::future::Future;

use shared_proto::{CachedCall, CallId, Reply, Request, MAX_PAGE};

/// Why paging stopped.
#[derive(Debug, thiserror::Error)]
pub enum PagingError<E> {
    /// A request failed.
    #[error("{0}")]
    Request(E),
    /// The server answered with a reply of the wrong kind.
    #[error("unexpected reply to a fetch: {0:?}")]
    Unexpected(Box<Reply>),
    /// The server said more calls follow but the page did not advance the cursor.
    #[error("a page of cached calls did not advance past call {after}")]
    NoProgress {
        /// The cursor that did not move.
        after: CallId,
    },
}

/// The state of one fetch of all cached calls: the cursor and whether it is done.
#[derive(Debug, Clone)]
pub struct CachedPager {
    /// Only calls with a larger id come next.
    after: CallId,
    /// Page size asked for.
    limit: u16,
    /// The last page said no more follow.
    done: bool,
}

impl Default for CachedPager {
    fn default() -> Self {
        Self::new()
    }
}

impl CachedPager {
    /// A fetch from the start, in pages of [`MAX_PAGE`].
    pub fn new() -> Self {
        // MAX_PAGE is 256, which fits a u16.
        Self::with_page_size(MAX_PAGE as u16)
    }

    /// A fetch from the start in pages of `limit` (clamped to `1..=MAX_PAGE`).
    pub fn with_page_size(limit: u16) -> Self {
        CachedPager {
            after: 0,
            limit: limit.clamp(1, MAX_PAGE as u16),
            done: false,
        }
    }

    /// The next request to send, or `None` once the last page arrived.
    pub fn next_request(&self) -> Option<Request> {
        (!self.done).then_some(Request::FetchCached {
            after: self.after,
            limit: self.limit,
        })
    }

    /// Takes the reply to [`CachedPager::next_request`] and returns its page's calls.
    pub fn on_reply<E>(&mut self, reply: Reply) -> Result<Vec<CachedCall>, PagingError<E>> {
        let Reply::Cached(page) = reply else {
            return Err(PagingError::Unexpected(Box::new(reply)));
        };
        match page.calls.last() {
            Some(last) if last.call_id > self.after => self.after = last.call_id,
            _ if page.more => return Err(PagingError::NoProgress { after: self.after }),
            _ => {}
        }
        self.done = !page.more;
        Ok(page.calls)
    }
}

/// Fetches every cached call, page by page, through `request` (without acknowledging).
/// Each page must advance the cursor, so this ends after at most one round trip per
/// page the server holds.
pub async fn fetch_all_cached<F, Fut, E>(mut request: F) -> Result<Vec<CachedCall>, PagingError<E>>
where
    F: FnMut(Request) -> Fut,
    Fut: Future<Output = Result<Reply, E>>,
{
    let mut pager = CachedPager::new();
    let mut out = Vec::new();
    while let Some(req) = pager.next_request() {
        let reply = request(req).await.map_err(PagingError::Request)?;
        out.extend(pager.on_reply(reply)?);
    }
    Ok(out)
}

/// The acknowledgements for `ids`, at most [`MAX_PAGE`] ids each.
pub fn ack_requests(ids: &[CallId]) -> impl Iterator<Item = Request> + '_ {
    ids.chunks(MAX_PAGE).map(|chunk| Request::AckCached {
        call_ids: chunk.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::{CachedPage, MissedReason, NetState};

    fn call(call_id: CallId) -> CachedCall {
        CachedCall {
            call_id,
            caller: 1,
            callee: 2,
            call_date_ms: 0,
            reason: MissedReason::Offline,
            caller_state: NetState::Offline,
        }
    }

    fn page(ids: &[CallId], more: bool) -> Reply {
        Reply::Cached(CachedPage {
            calls: ids.iter().copied().map(call).collect(),
            more,
        })
    }

    #[test]
    fn the_cursor_follows_the_last_call_of_each_page() {
        let mut p = CachedPager::with_page_size(2);
        assert_eq!(
            p.next_request(),
            Some(Request::FetchCached { after: 0, limit: 2 })
        );
        assert_eq!(p.on_reply::<()>(page(&[3, 5], true)).unwrap().len(), 2);
        assert_eq!(
            p.next_request(),
            Some(Request::FetchCached { after: 5, limit: 2 })
        );
        assert_eq!(p.on_reply::<()>(page(&[9], false)).unwrap().len(), 1);
        assert_eq!(p.next_request(), None);
    }

    #[test]
    fn a_page_that_does_not_advance_stops_the_fetch() {
        let mut p = CachedPager::new();
        p.on_reply::<()>(page(&[4], true)).unwrap();
        assert!(matches!(
            p.on_reply::<()>(page(&[], true)),
            Err(PagingError::NoProgress { after: 4 })
        ));
        assert!(matches!(
            p.on_reply::<()>(Reply::Done),
            Err(PagingError::Unexpected(_))
        ));
    }

    #[test]
    fn acknowledgements_are_paged() {
        let ids: Vec<CallId> = (1..=600).collect();
        let sizes: Vec<usize> = ack_requests(&ids)
            .map(|r| match r {
                Request::AckCached { call_ids } => call_ids.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
