//! Opening a Linux TUN device (`/dev/net/tun`, TUNSETIFF) without packet-information headers.

#![allow(
    unsafe_code,
    reason = "TUNSETIFF is an ioctl; there is no safe wrapper in our dependencies"
)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens (creating if needed) the TUN interface `name`.
pub fn open(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: the fd is open for the lifetime of `file`, and `ifr` is a valid ifreq that
    // outlives the call; TUNSETIFF reads and writes only that struct.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETIFF as _,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}
