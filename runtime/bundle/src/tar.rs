//! A strict ustar reader and a canonical ustar writer.
//!
//! Bundles are plain tar files so a person can inspect them with `tar tvf`, but the reader
//! accepts only the canonical form the writer produces: ustar headers with exact numeric field
//! encodings, regular files only, zero padding, exactly two zero blocks at the end and nothing
//! after. Any single changed byte anywhere in a bundle therefore either breaks the archive
//! structure (caught here), or changes a file or the manifest (caught by hashes and the
//! signature).

use std::io::{self, Read, Write};

use crate::error::{BundleError, Result};

const BLOCK: usize = 512;
const BLOCK_U64: u64 = BLOCK as u64;

/// Longest path the ustar `name` field holds without the `prefix` field.
pub(crate) const MAX_PATH_LEN: usize = 100;

/// One entry header read from the archive.
#[derive(Debug)]
pub(crate) struct EntryHeader {
    /// Validated relative path.
    pub(crate) path: String,
    /// Size of the entry's data in bytes.
    pub(crate) size: u64,
}

/// Reads entries one by one; the caller decides, from the header, whether to read the data.
pub(crate) struct TarReader<R> {
    inner: R,
    offset: u64,
    finished: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            finished: false,
        }
    }

    /// Returns the next entry's header, or `None` at the (verified) end of the archive.
    pub(crate) fn next_header(&mut self) -> Result<Option<EntryHeader>> {
        if self.finished {
            return Ok(None);
        }
        let offset = self.offset;
        let mut block = [0u8; BLOCK];
        self.read_exact(&mut block, "an entry header")?;
        if block.iter().all(|&b| b == 0) {
            self.finish()?;
            return Ok(None);
        }
        parse_header(&block, offset).map(Some)
    }

    /// Reads the data of the entry whose header was just returned, and its padding.
    pub(crate) fn read_data(&mut self, header: &EntryHeader, out: &mut impl Write) -> Result<()> {
        let mut remaining = header.size;
        let mut buf = [0u8; 8192];
        while remaining > 0 {
            let n = remaining.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..n], "an entry's data")?;
            out.write_all(&buf[..n])?;
            remaining -= n as u64;
        }
        self.skip_padding(header.size)
    }

    fn skip_padding(&mut self, size: u64) -> Result<()> {
        let pad = (BLOCK_U64 - size % BLOCK_U64) % BLOCK_U64;
        let mut buf = [0u8; BLOCK];
        let pad_start = self.offset;
        self.read_exact(&mut buf[..pad as usize], "an entry's padding")?;
        if let Some(i) = buf[..pad as usize].iter().position(|&b| b != 0) {
            return Err(BundleError::NonZeroPadding {
                offset: pad_start + i as u64,
            });
        }
        Ok(())
    }

    /// Checks the second zero block and that nothing follows it.
    fn finish(&mut self) -> Result<()> {
        let mut block = [0u8; BLOCK];
        let start = self.offset;
        self.read_exact(&mut block, "the end-of-archive marker")?;
        if let Some(i) = block.iter().position(|&b| b != 0) {
            return Err(BundleError::NonZeroPadding {
                offset: start + i as u64,
            });
        }
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => break,
                Ok(_) => return Err(BundleError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.finished = true;
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(BundleError::Truncated(what)),
            Err(e) => Err(e.into()),
        }
    }
}

fn parse_header(block: &[u8; BLOCK], offset: u64) -> Result<EntryHeader> {
    let malformed = |reason| BundleError::MalformedHeader { offset, reason };
    let stored = parse_octal(&block[148..156], 6, b"\0 ").ok_or(malformed("bad checksum field"))?;
    let computed: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != computed {
        return Err(BundleError::HeaderChecksum { offset });
    }
    if &block[257..263] != b"ustar\0" || &block[263..265] != b"00" {
        return Err(malformed("not a ustar header"));
    }
    if block[345..500].iter().any(|&b| b != 0) {
        return Err(malformed(
            "long names (ustar prefix field) are not supported",
        ));
    }
    let name = cstr(&block[..100]);
    let path = String::from_utf8_lossy(name).into_owned();
    match block[156] {
        b'0' => {}
        b'1' => return Err(BundleError::HardLinkEntry { path }),
        b'2' => return Err(BundleError::SymlinkEntry { path }),
        other => {
            return Err(BundleError::UnsupportedEntryType {
                path,
                typeflag: char::from(other),
            });
        }
    }
    let size = parse_octal(&block[124..136], 11, b"\0").ok_or(malformed("bad size field"))?;
    let path = validate_path(name)?.to_owned();
    Ok(EntryHeader { path, size })
}

/// Parses exactly `digits` octal digits followed by exactly `terminator`.
fn parse_octal(field: &[u8], digits: usize, terminator: &[u8]) -> Option<u64> {
    if field.len() != digits + terminator.len() || &field[digits..] != terminator {
        return None;
    }
    field[..digits].iter().try_fold(0u64, |acc, &d| {
        (b'0'..=b'7')
            .contains(&d)
            .then(|| acc * 8 + u64::from(d - b'0'))
    })
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Accepts only plain relative paths: `a/b.onnx`, never `/x`, `../x`, `a//b`, `./a` or `a/`.
pub(crate) fn validate_path(raw: &[u8]) -> Result<&str> {
    let lossy = || String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |reason| BundleError::UnsafePath {
        path: lossy(),
        reason,
    };
    let path = std::str::from_utf8(raw).map_err(|_| unsafe_path("not valid UTF-8"))?;
    if path.is_empty() {
        return Err(unsafe_path("empty path"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(unsafe_path("longer than 100 bytes"));
    }
    if path.starts_with('/') {
        return Err(unsafe_path("absolute path"));
    }
    for component in path.split('/') {
        match component {
            ".." => return Err(unsafe_path("`..` climbs out of the bundle")),
            "." | "" => return Err(unsafe_path("empty or `.` path component")),
            c if !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
            {
                return Err(unsafe_path(
                    "only ASCII letters, digits, `.`, `_`, `-` and `/` are allowed",
                ));
            }
            _ => {}
        }
    }
    Ok(path)
}

/// Writes the canonical form [`TarReader`] accepts.
pub(crate) struct TarWriter<W> {
    inner: W,
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self { inner }
    }

    /// Appends one regular file. The path must already be validated.
    pub(crate) fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[148..156].copy_from_slice(b"        ");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.inner.write_all(&h)?;
        self.inner.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.inner.write_all(&[0u8; BLOCK][..pad])
    }

    /// Writes the end-of-archive marker and returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (p, d) in entries {
            w.append(p, d).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = archive(&[("a.txt", b"hello"), ("dir/b.bin", &[7u8; 1000])]);
        let mut r = TarReader::new(&bytes[..]);
        let h = r.next_header().unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.size), ("a.txt", 5));
        let mut out = Vec::new();
        r.read_data(&h, &mut out).unwrap();
        assert_eq!(out, b"hello");
        let h = r.next_header().unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.size), ("dir/b.bin", 1000));
        let mut out = Vec::new();
        r.read_data(&h, &mut out).unwrap();
        assert_eq!(out.len(), 1000);
        assert!(r.next_header().unwrap().is_none());
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut bytes = archive(&[("a", b"x")]);
        bytes.push(0);
        let mut r = TarReader::new(&bytes[..]);
        let h = r.next_header().unwrap().unwrap();
        r.read_data(&h, &mut io::sink()).unwrap();
        assert!(matches!(r.next_header(), Err(BundleError::TrailingData)));
    }

    #[test]
    fn paths() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/",
            "",
            "a b",
        ] {
            assert!(
                matches!(
                    validate_path(bad.as_bytes()),
                    Err(BundleError::UnsafePath { .. })
                ),
                "{bad:?} accepted"
            );
        }
        for good in [
            "manifest.json",
            "models/digits.onnx",
            "guest.wasm",
            "a-b_c.d",
        ] {
            assert_eq!(validate_path(good.as_bytes()).unwrap(), good);
        }
    }

    #[test]
    fn octal_fields_are_strict() {
        assert_eq!(parse_octal(b"00000000012\0", 11, b"\0"), Some(10));
        assert_eq!(parse_octal(b"0000000001 \0", 11, b"\0"), None);
        assert_eq!(parse_octal(b"000012\0 ", 6, b"\0 "), Some(10));
        assert_eq!(parse_octal(b"000012  ", 6, b"\0 "), None);
        assert_eq!(parse_octal(b"000018\0 ", 6, b"\0 "), None);
    }
}
