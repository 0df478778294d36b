//! The open-file limit, which bounds how many TVs one process can hold or simulate.

/// Raises the soft open-file limit to the hard one; returns `(soft, hard)` after.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in, which
    // lives for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // `rlim_t` is 64 bits on x86_64 and aarch64, 32 on armv7.
    #[allow(clippy::useless_conversion)]
    Ok((u64::from(lim.rlim_cur), u64::from(lim.rlim_max)))
}
