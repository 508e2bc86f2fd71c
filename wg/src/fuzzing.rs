//! Harnesses shared by the fuzz targets (`fuzz/`) and the tests that replay their corpora:
//! each takes arbitrary bytes and asserts what must hold (a panic is a finding).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};

use crate::key::PrivateKey;
use crate::uapi::{DeviceInfo, DeviceUpdate, LineReader, Request, read_request};

/// A UAPI connection's bytes, as the userspace device reads them: requests are bounded, and a
/// `set` that parses prints back to text that parses to the same update.
pub fn uapi(data: &[u8]) {
    let mut r = LineReader::new(data);
    while let Ok(Some(req)) = read_request(&mut r) {
        if let Request::Set(lines) = req
            && let Ok(u) = DeviceUpdate::parse(&lines)
        {
            let text = u.to_text();
            let mut again = LineReader::new(text.as_bytes());
            let lines = again.read_block().unwrap_or_default();
            let back =
                DeviceUpdate::parse(&lines[1..]).unwrap_or_else(|e| panic!("{e}: {:?}", *text));
            assert_eq!(back.peers, u.peers);
            assert_eq!(back.listen_port, u.listen_port);
        }
    }
    // The same bytes as an answer to `get`.
    if let Ok(lines) = LineReader::new(data).read_block() {
        let _ = DeviceInfo::parse_lines(&lines);
    }
}

/// A key file's contents: loaded only when exactly 32 bytes (never a panic, never a key
/// made up from other sizes).
pub fn key_file(data: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::env::temp_dir().join(format!("meshd-fuzz-key-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("wg.key");
    let _ = std::fs::remove_file(&path);
    let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    match PrivateKey::load_or_generate(&path) {
        Ok(k) => {
            assert_eq!(data.len(), 32, "a key was loaded from {} bytes", data.len());
            let _ = k.public_key();
        }
        Err(e) => assert!(data.len() != 32, "a 32-byte key file was refused: {e}"),
    }
    let _ = std::fs::remove_file(&path);
}

/// A packet from the TUN device (first two bytes: the MSS): segmenting never panics, every
/// segment fits the MSS, and the coalescer takes the segments back without panicking.
pub fn offload(data: &[u8]) {
    let [a, b, pkt @ ..] = data else { return };
    let mss = usize::from(u16::from_be_bytes([*a, *b])).clamp(1, 65_535);
    let (mut out, mut lens) = (Vec::new(), Vec::new());
    if crate::offload::segment_tcp(pkt, mss, &mut out, &mut lens).is_some() {
        assert_eq!(lens.iter().sum::<usize>(), out.len());
        let mut run = crate::offload::Coalescer::default();
        let mut at = 0;
        for len in &lens {
            let seg = &out[at..at + len];
            at += len;
            if !run.try_append(seg) {
                if !run.is_empty() {
                    let _ = run.finish();
                }
                let _ = run.start(seg);
            }
        }
        if !run.is_empty() {
            let _ = run.finish();
        }
    }
    let mut run = crate::offload::Coalescer::default();
    if run.start(pkt) {
        let _ = run.try_append(pkt);
        let _ = run.finish();
    }
}

/// A datagram arriving on the UDP socket, through what the device does with one: the mac1
/// and cookie checks, then the noise state of a peer. Never a panic; nothing reaches the tunnel
/// without a session.
pub fn datagram(data: &[u8]) {
    let ours = PrivateKey::from_bytes([7; 32]);
    let theirs = PrivateKey::from_bytes([9; 32]);
    let public = x25519_dalek::PublicKey::from(ours.secret());
    let limiter = Arc::new(RateLimiter::new(&public, 100));
    let mut tunn = Tunn::new(
        ours.secret().clone(),
        x25519_dalek::PublicKey::from(theirs.secret()),
        None,
        None,
        1,
        Some(limiter.clone()),
    );
    let src = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 12));
    let mut out = vec![0u8; 65_535 + 32];
    if limiter.verify_packet(Some(src), data, &mut out).is_err() {
        return;
    }
    match tunn.decapsulate(Some(src), data, &mut out) {
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            panic!("a datagram reached the tunnel without a handshake")
        }
        _ => {}
    }
}

/// Runs `harness` on every file of the corpus `fuzz/corpus/<name>/` (what the fuzzers kept),
/// as an ordinary test does; an empty or missing corpus is a failure.
pub fn replay_corpus(name: &str, harness: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .collect();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for f in files {
        harness(&std::fs::read(f.path()).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    /// Every input the fuzzers kept (`fuzz/corpus/<target>/`) runs as an ordinary test.
    #[test]
    fn replays_the_fuzz_corpora() {
        for (name, harness) in [
            ("uapi", super::uapi as fn(&[u8])),
            ("key_file", super::key_file),
            ("offload", super::offload),
            ("datagram", super::datagram),
        ] {
            super::replay_corpus(name, harness);
        }
    }
}
