//! Opening a Linux TUN device (`/dev/net/tun`, TUNSETIFF) without packet-information headers,
//! optionally with a virtio-net header and TCP segmentation offload (TUNSETOFFLOAD), so that
//! the kernel hands over TCP super-packets instead of one packet per read.

#![allow(
    unsafe_code,
    reason = "TUNSETIFF and TUNSETOFFLOAD are ioctls; there is no safe wrapper in our dependencies"
)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

pub struct Tun {
    pub file: File,
    /// Every read and write carries a `virtio_net_hdr` (see `offload`).
    pub vnet_hdr: bool,
}

/// Opens (creating if needed) the TUN interface `name`; with `offload`, asks for a virtio-net
/// header and TSO. Offload that the kernel refuses is quietly not used.
pub fn open(name: &str, offload: bool) -> std::io::Result<Tun> {
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
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if offload {
        flags |= IFF_VNET_HDR;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
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
    if offload {
        let features = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                features as libc::c_ulong,
            )
        };
        if rc < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "the kernel refused TUN offloads; packets come one by one");
        }
    }
    Ok(Tun {
        file,
        vnet_hdr: offload,
    })
}
