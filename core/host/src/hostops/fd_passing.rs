//! File descriptors over the helper's Unix socket (`SCM_RIGHTS`): the
//! helper binds what a user may not (port 53 on its gateway) and hands the
//! open sockets back with the response line.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most descriptors one line may carry.
pub const MAX_FDS: usize = 4;

/// Writes all of `bytes` to `stream`, the descriptors `fds` attached to the
/// first byte.
pub fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let n = sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Reads one line (up to `max` bytes, without the newline) from `stream`,
/// with every descriptor that came along. Reads byte-exact: nothing after
/// the newline is consumed.
pub fn recv_line_with_fds(
    stream: &UnixStream,
    max: usize,
) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let got = {
            let mut iov = [IoSliceMut::new(&mut byte)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for fd in raw {
                        // SAFETY: the kernel just installed `fd` in this
                        // process for this message (SCM_RIGHTS); nothing
                        // else knows it, so it is ours to own and close.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            msg.bytes
        };
        if got == 0 {
            if line.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
    }
    let line = String::from_utf8(line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((line, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_line_and_its_descriptors_arrive_together_and_nothing_after_it_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut pr, pw) = UnixStream::pair().unwrap();
        send_with_fds(&a, b"{\"ok\":1}\nnext", &[std::os::fd::AsFd::as_fd(&pw)]).unwrap();
        let (line, fds) = recv_line_with_fds(&b, 1024).unwrap();
        assert_eq!(line, "{\"ok\":1}");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same socket: writing to it reaches `pr`.
        let mut passed = UnixStream::from(fds.into_iter().next().unwrap());
        drop(pw);
        passed.write_all(b"through").unwrap();
        drop(passed);
        let mut got = String::new();
        pr.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through");
        let mut rest = [0u8; 4];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"next");
    }

    #[test]
    fn an_overlong_line_or_a_closed_peer_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&a, &[b'x'; 100], &[]).unwrap();
        let err = recv_line_with_fds(&b, 10).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        drop(a);
        let (_, b2) = {
            let (a2, b2) = UnixStream::pair().unwrap();
            drop(a2);
            ((), b2)
        };
        let err = recv_line_with_fds(&b2, 10).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
