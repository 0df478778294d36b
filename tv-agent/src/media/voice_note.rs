//! Voice messages: audio from any source (the microphone, a tone, a WAV file) recorded into
//! an Ogg Opus file (RFC 7845), and such a file played back to any sink.
//!
//! The file is what any player reads: an `OpusHead` page (mono, 48 kHz, the encoder's
//! lookahead as pre-skip), an `OpusTags` page, then one 20 ms Opus packet per frame at
//! 24 kbit/s. The encoder is flushed with silence so the last real sample is coded, and
//! the last page's granule position trims that padding off (end trimming, RFC 7845 §4.4),
//! so the file plays for exactly the recorded duration. The file is written beside its
//! destination, synced and renamed into place: a half-written recording is never sent.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ogg::{PacketReader, PacketWriteEndInfo, PacketWriter};

use super::audio::{open_source, AudioSink, AudioSource, AudioSpec, FRAME, SAMPLE_RATE};

/// The bit rate of a voice message: speech at 24 kbit/s is about 180 KB a minute.
pub const BITRATE: i32 = 24_000;
/// The longest recording this module makes, whatever is asked (the server's default
/// limit is 120 s; it refuses longer ones).
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// The Ogg stream's serial number (one logical stream per file).
const SERIAL: u32 = 0x7476_6d73;
/// The largest Opus packet the encoder may write (RFC 6716 §3.4: 1275 bytes a frame).
const MAX_PACKET: usize = 1_275;

/// What was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The audio's length, without the encoder's padding.
    pub duration_ms: u64,
    /// The file's size.
    pub bytes: u64,
}

/// Records `duration` of audio from `spec` into the Ogg Opus file `out` (replacing it).
/// A sound card is read in real time; a tone or a file as fast as it encodes.
pub fn record(spec: &AudioSpec, duration: Duration, out: &Path) -> anyhow::Result<Recorded> {
    if duration.is_zero() {
        bail!("a voice message needs a length above zero");
    }
    if duration > MAX_DURATION {
        bail!(
            "a voice message is at most {} s, not {} s",
            MAX_DURATION.as_secs(),
            duration.as_secs()
        );
    }
    let mut source = open_source(spec)?;
    let frames = duration.as_millis().div_ceil(20) as u64;
    let tmp = out.with_extension("opus.part");
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = BufWriter::new(file);
        encode(source.as_mut(), frames, &mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("saving {}", out.display()))?;
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Recorded {
        duration_ms: frames * 20,
        bytes: std::fs::metadata(out)?.len(),
    })
}

/// Encodes `frames` 20 ms frames of `source` as an Ogg Opus stream into `out`.
pub fn encode<W: Write>(source: &mut dyn AudioSource, frames: u64, out: W) -> anyhow::Result<()> {
    let mut encoder =
        opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)
            .context("creating the Opus encoder")?;
    encoder.set_bitrate(opus::Bitrate::Bits(BITRATE))?;
    let pre_skip = u16::try_from(encoder.get_lookahead()?).context("the encoder's lookahead")?;
    let mut writer = PacketWriter::new(out);

    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1); // version
    head.push(1); // channels
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // channel mapping family 0: mono or stereo, no table
    writer.write_packet(head, SERIAL, PacketWriteEndInfo::EndPage, 0)?;

    let vendor = concat!("tv-agent ", env!("CARGO_PKG_VERSION"));
    let mut tags = Vec::new();
    tags.extend_from_slice(b"OpusTags");
    tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    tags.extend_from_slice(vendor.as_bytes());
    tags.extend_from_slice(&0u32.to_le_bytes()); // no user comments
    writer.write_packet(tags, SERIAL, PacketWriteEndInfo::EndPage, 0)?;

    // The encoder holds `pre_skip` samples back; extra silent frames flush them out.
    let padding = u64::from(pre_skip).div_ceil(FRAME as u64);
    let total = frames + padding;
    let end_granule = u64::from(pre_skip) + frames * FRAME as u64;
    let mut pcm = vec![0i16; FRAME];
    let mut packet = vec![0u8; MAX_PACKET];
    for i in 0..total {
        if i < frames {
            source.read_frame(&mut pcm)?;
        } else {
            pcm.fill(0);
        }
        let n = encoder.encode(&pcm, &mut packet)?;
        let last = i + 1 == total;
        let (info, granule) = if last {
            (PacketWriteEndInfo::EndStream, end_granule)
        } else {
            (PacketWriteEndInfo::NormalPacket, (i + 1) * FRAME as u64)
        };
        writer.write_packet(packet[..n].to_vec(), SERIAL, info, granule)?;
    }
    writer.inner_mut().flush()?;
    Ok(())
}

/// A decoded voice message.
#[derive(Debug)]
pub struct Decoded {
    /// 48 kHz mono samples, pre-skip and end padding removed.
    pub pcm: Vec<i16>,
}

/// Decodes an Ogg Opus stream (mono or stereo, mixed down) into 48 kHz mono samples.
/// At most [`MAX_DURATION`] of audio is decoded.
pub fn decode<R: Read + std::io::Seek>(input: R) -> anyhow::Result<Decoded> {
    let mut reader = PacketReader::new(input);
    let head = reader
        .read_packet()?
        .context("the file is empty: no Ogg packet")?;
    let data = &head.data;
    if data.len() < 19 || &data[..8] != b"OpusHead" {
        bail!("not an Ogg Opus file (no OpusHead)");
    }
    let channels = match data[9] {
        1 => opus::Channels::Mono,
        2 => opus::Channels::Stereo,
        n => bail!("{n} channels: only mono and stereo voice messages play"),
    };
    let pre_skip = u64::from(u16::from_le_bytes([data[10], data[11]]));
    let serial = head.stream_serial();
    let _tags = reader.read_packet()?.context("no OpusTags packet")?;
    let mut decoder = opus::Decoder::new(SAMPLE_RATE, channels)?;
    let width = if channels == opus::Channels::Stereo {
        2
    } else {
        1
    };
    let mut frame = vec![0i16; 5760 * width];
    let mut pcm = Vec::new();
    let limit = MAX_DURATION.as_secs() * u64::from(SAMPLE_RATE);
    let mut decoded: u64 = 0;
    let mut end: Option<u64> = None;
    while let Some(p) = reader.read_packet()? {
        if p.stream_serial() != serial {
            continue;
        }
        let n = decoder.decode(&p.data, &mut frame, false)?;
        decoded += n as u64;
        for s in frame[..n * width].chunks(width) {
            let mixed = s.iter().map(|&v| i32::from(v)).sum::<i32>() / width as i32;
            pcm.push(mixed as i16);
        }
        if p.last_in_stream() {
            end = Some(p.absgp_page());
            break;
        }
        if decoded > limit + pre_skip {
            bail!("longer than {} s", MAX_DURATION.as_secs());
        }
    }
    let end = end.unwrap_or(decoded).min(decoded);
    let start = pre_skip.min(end) as usize;
    pcm.truncate(end as usize);
    pcm.drain(..start);
    Ok(Decoded { pcm })
}

/// Plays the voice message at `path` into `sink`, in 20 ms frames; `paced` waits 20 ms a
/// frame (a sound card), otherwise as fast as the sink takes them (a file).
pub fn play(path: &Path, sink: &mut dyn AudioSink, paced: bool) -> anyhow::Result<Duration> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let decoded = decode(BufReader::new(file))
        .with_context(|| format!("decoding the voice message {}", path.display()))?;
    let start = std::time::Instant::now();
    let mut frame = vec![0i16; FRAME];
    for (i, chunk) in decoded.pcm.chunks(FRAME).enumerate() {
        frame[..chunk.len()].copy_from_slice(chunk);
        frame[chunk.len()..].fill(0);
        sink.write_frame(&frame)?;
        if paced {
            let due = start + Duration::from_millis(20 * (i as u64 + 1));
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        }
    }
    sink.finish()?;
    Ok(Duration::from_millis(
        decoded.pcm.len() as u64 * 1000 / u64::from(SAMPLE_RATE),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Power of `freq` in `samples` (Goertzel).
    fn tone_power(samples: &[i16], freq: f64) -> f64 {
        let k = 2.0 * (std::f64::consts::TAU * freq / f64::from(SAMPLE_RATE)).cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for &x in samples {
            let s = f64::from(x) + k * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        s1 * s1 + s2 * s2 - k * s1 * s2
    }

    #[test]
    fn a_recorded_tone_decodes_to_the_tone_for_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("note.opus");
        let rec = record(&AudioSpec::Tone(440.0), Duration::from_millis(2_000), &out).unwrap();
        assert_eq!(rec.duration_ms, 2_000);
        assert!(rec.bytes > 3_000 && rec.bytes < 12_000, "{rec:?}");
        assert!(!dir.path().join("note.opus.part").exists());
        let d = decode(File::open(&out).unwrap()).unwrap();
        assert_eq!(d.pcm.len(), 96_000, "end trimming leaves exactly 2 s");
        let tail = &d.pcm[4_800..];
        assert!(tone_power(tail, 440.0) > 50.0 * tone_power(tail, 1_000.0));
    }

    #[test]
    fn ffmpeg_reads_the_file_as_opus_with_its_duration() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("note.opus");
        record(&AudioSpec::Tone(440.0), Duration::from_millis(3_000), &out).unwrap();
        let probe = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name:format=duration",
            ])
            .args(["-of", "default=nw=1"])
            .arg(&out)
            .output()
            .expect("ffprobe is installed (scripts/setup.sh installs ffmpeg)");
        assert!(probe.status.success(), "{probe:?}");
        let text = String::from_utf8_lossy(&probe.stdout);
        assert!(text.contains("codec_name=opus"), "{text}");
        let secs: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("duration="))
            .unwrap()
            .parse()
            .unwrap();
        assert!((secs - 3.0).abs() < 0.03, "ffprobe says {secs} s");
    }

    #[test]
    fn playing_writes_the_audio_to_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let note = dir.path().join("note.opus");
        record(&AudioSpec::Tone(440.0), Duration::from_millis(1_000), &note).unwrap();
        let wav = dir.path().join("out.wav");
        let mut sink = super::super::audio::open_sink(&AudioSpec::Wav(wav.clone())).unwrap();
        let played = play(&note, sink.as_mut(), false).unwrap();
        assert_eq!(played, Duration::from_millis(1_000));
        let samples: Vec<i16> = hound::WavReader::open(&wav)
            .unwrap()
            .samples::<i16>()
            .map(|s| s.unwrap())
            .collect();
        assert_eq!(samples.len(), 48_000);
    }

    #[test]
    fn nonsense_is_refused_clearly() {
        let err = decode(std::io::Cursor::new(b"hello, not ogg".to_vec())).unwrap_err();
        assert!(!format!("{err:#}").is_empty());
        let err = record(
            &AudioSpec::Tone(440.0),
            Duration::ZERO,
            Path::new("/nonexistent/x.opus"),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("above zero"));
    }
}
