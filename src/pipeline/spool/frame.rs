//! The on-disk frame: pure functions, no I/O.
//!
//! A segment file is [`MAGIC`] followed by frames. A frame is:
//!
//! | bytes | field                                   |
//! |-------|-----------------------------------------|
//! | 4     | payload length, u32 little-endian       |
//! | 4     | CRC-32 (IEEE) of the payload, u32 LE    |
//! | n     | payload: the record as JSON             |
//!
//! Do not reorder or resize these fields: segments written by an earlier run are read
//! back by the next one.
//!
//! # Resynchronising after a corrupt frame
//! No marker is written between frames, yet one is implied: a payload is JSON written by
//! serde_json, which escapes every control character, so no payload byte is below `0x20`,
//! while the most significant byte of a valid length (below [`MAX_FRAME`], 256 MiB) is
//! below `0x10`, and a valid length is never 0 (no record serialises to nothing; eight
//! zero bytes, as a crash can leave, would otherwise pass: the CRC of nothing is 0). A
//! position inside a payload, up to its last three bytes, can therefore never pass for a
//! header. The few positions the byte ranges do not rule out (the last three bytes of a
//! payload, the inside of a header) are ruled out by the CRC, which a wrong position
//! matches with odds of 2^-32. [`resync`] searches forward for the next position whose
//! header announces a length that fits and whose payload matches its CRC: that is the
//! next real frame. A corrupt frame costs itself (and any frames it overwrote), not the
//! rest of its segment.

use crate::model::Interaction;

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"OASPOOL1";
/// Length of a frame header (length + CRC).
pub const HEADER: usize = 8;
/// Frames this large or larger are treated as corruption when read back: no valid record
/// is this large (fields are truncated at `limits.max_field_bytes` before they get here).
/// At most 2^28, so a valid length's top byte is below any JSON byte (see [`resync`]).
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

/// What decoding the bytes at one position found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame whose CRC matches: its payload, and the frame's total length.
    Frame {
        /// The payload bytes.
        payload: &'a [u8],
        /// Header plus payload.
        len: usize,
    },
    /// No bytes left: a clean end.
    End,
    /// The bytes here are not a whole valid frame.
    Corrupt(Corruption),
}

/// Why the bytes at a position are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// Fewer bytes than a header: a write cut short.
    TornHeader,
    /// The header announces more bytes than there are: a write cut short.
    TornPayload,
    /// The length is 0 or not below [`MAX_FRAME`]: not a header.
    LengthOutOfRange,
    /// The payload does not match its CRC.
    CrcMismatch,
}

impl Corruption {
    /// A fixed short description, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Corruption::TornHeader => "torn frame header",
            Corruption::TornPayload => "torn frame",
            Corruption::LengthOutOfRange => "frame length out of range",
            Corruption::CrcMismatch => "CRC mismatch",
        }
    }
}

/// Encodes a payload as one frame.
pub fn encode_payload(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Encodes a record as one frame (JSON payload), serialised straight into the frame.
pub fn encode(record: &Interaction) -> Vec<u8> {
    let mut frame = vec![0u8; HEADER];
    // Writing into a Vec cannot fail, and a record of strings and numbers always
    // serialises; an empty payload would fail to decode and be counted, never hidden.
    let _ = serde_json::to_writer(&mut frame, record);
    let payload_len = (frame.len() - HEADER) as u32;
    let crc = crc32fast::hash(&frame[HEADER..]);
    frame[0..4].copy_from_slice(&payload_len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    frame
}

/// Reads a header: the payload length and CRC it announces.
pub fn header(bytes: &[u8; HEADER]) -> (usize, u32) {
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (len, crc)
}

/// Checks a header against the bytes that may follow it; `Ok(len)` when a payload of
/// `len` bytes fits in `available` bytes after the header.
pub fn check_header(bytes: &[u8; HEADER], available_after: u64) -> Result<(usize, u32), Corruption> {
    let (len, crc) = header(bytes);
    if len == 0 || len >= MAX_FRAME {
        return Err(Corruption::LengthOutOfRange);
    }
    if len as u64 > available_after {
        return Err(Corruption::TornPayload);
    }
    Ok((len, crc))
}

/// Decodes the frame at the start of `bytes`. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Decoded<'_> {
    if bytes.is_empty() {
        return Decoded::End;
    }
    let Some(head) = bytes.first_chunk::<HEADER>() else {
        return Decoded::Corrupt(Corruption::TornHeader);
    };
    let (len, crc) = match check_header(head, (bytes.len() - HEADER) as u64) {
        Ok(h) => h,
        Err(c) => return Decoded::Corrupt(c),
    };
    let payload = &bytes[HEADER..HEADER + len];
    if crc32fast::hash(payload) != crc {
        return Decoded::Corrupt(Corruption::CrcMismatch);
    }
    Decoded::Frame { payload, len: HEADER + len }
}

/// The offset of the next valid frame in `bytes` after a corrupt one at offset 0, if any
/// (see the module docs for why this cannot land inside a payload).
pub fn resync(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len()).find(|&at| {
        // Cheap test first: a length's top byte is below 0x10.
        bytes.get(at + 3).is_some_and(|&top| top < 0x10) && matches!(decode(&bytes[at..]), Decoded::Frame { .. })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips() {
        let record = Interaction::new("why is web-1 crashlooping?");
        let frame = encode(&record);
        let Decoded::Frame { payload, len } = decode(&frame) else { panic!("not a frame") };
        assert_eq!(len, frame.len());
        assert_eq!(serde_json::from_slice::<Interaction>(payload).unwrap(), record);
        assert_eq!(encode_payload(payload), frame);
    }

    #[test]
    fn zero_bytes_are_not_a_frame() {
        // Regression: length 0 with CRC 0 decoded as an empty frame, so a zero-filled
        // tail after a crash read as thousands of records.
        assert_eq!(decode(&[0u8; 64]), Decoded::Corrupt(Corruption::LengthOutOfRange));
        let mut bytes = encode(&Interaction::new("only"));
        let whole = bytes.len();
        bytes.extend_from_slice(&[0u8; 4096]);
        assert!(matches!(decode(&bytes), Decoded::Frame { len, .. } if len == whole));
        assert_eq!(resync(&bytes[whole..]), None);
    }

    #[test]
    fn resync_finds_the_frame_after_a_flipped_byte() {
        let a = encode(&Interaction::new("first"));
        let b = encode(&Interaction::new("second"));
        let mut bytes = [a.clone(), b.clone()].concat();
        bytes[HEADER + 3] ^= 0x55;
        assert_eq!(decode(&bytes), Decoded::Corrupt(Corruption::CrcMismatch));
        assert_eq!(resync(&bytes), Some(a.len()));
    }
}
