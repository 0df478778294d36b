//! Where call audio comes from and goes to: the TV's sound card (cpal), or, for machines
//! without one, a tone generator, WAV files and null. All exchange 20 ms frames of 48 kHz
//! mono 16-bit samples; the media engine paces them (ALSA's null device cannot).
//!
//! Specs, as given on the command line: `tone:HZ`, `wav:PATH`, `null`, `device[:NAME]`.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context};

use super::jitter::FRAME_SAMPLES;

/// Sample rate of call audio.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples per frame, as a length.
pub const FRAME: usize = FRAME_SAMPLES as usize;

/// A parsed audio spec.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioSpec {
    /// A sine tone at this frequency (source only).
    Tone(f32),
    /// A WAV file: read (looped) as a source, written as a sink.
    Wav(PathBuf),
    /// Silence in; discard out.
    Null,
    /// A sound card, by name or the default one.
    Device(Option<String>),
}

impl FromStr for AudioSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        Ok(match (kind, arg) {
            ("tone", Some(hz)) => {
                let hz: f32 = hz
                    .parse()
                    .with_context(|| format!("bad tone frequency {hz:?}"))?;
                if !(20.0..=20_000.0).contains(&hz) {
                    bail!("tone frequency must be 20..20000 Hz, not {hz}");
                }
                AudioSpec::Tone(hz)
            }
            ("wav", Some(path)) if !path.is_empty() => AudioSpec::Wav(PathBuf::from(path)),
            ("null", None) => AudioSpec::Null,
            ("device", name) => AudioSpec::Device(name.filter(|n| !n.is_empty()).map(String::from)),
            _ => bail!("unknown audio spec {s:?}: use tone:HZ, wav:PATH, null or device[:NAME]"),
        })
    }
}

/// Produces one frame of audio per call.
pub trait AudioSource: Send {
    /// Fills `out` (exactly [`FRAME`] samples).
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()>;
}

/// Consumes one frame of audio per call.
pub trait AudioSink: Send {
    /// Plays or stores `pcm` (exactly [`FRAME`] samples).
    fn write_frame(&mut self, pcm: &[i16]) -> anyhow::Result<()>;
    /// Flushes and closes (a WAV file gets its final header).
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Opens a source.
pub fn open_source(spec: &AudioSpec) -> anyhow::Result<Box<dyn AudioSource>> {
    Ok(match spec {
        AudioSpec::Tone(hz) => Box::new(Tone::new(*hz)),
        AudioSpec::Wav(path) => Box::new(WavSource::open(path.clone())?),
        AudioSpec::Null => Box::new(Silence),
        #[cfg(feature = "device")]
        AudioSpec::Device(name) => Box::new(device::Capture::open(name.as_deref())?),
        #[cfg(not(feature = "device"))]
        AudioSpec::Device(_) => bail!("this build has no sound card support (feature `device`)"),
    })
}

/// Opens a sink.
pub fn open_sink(spec: &AudioSpec) -> anyhow::Result<Box<dyn AudioSink>> {
    Ok(match spec {
        AudioSpec::Tone(_) => bail!("a tone is a source, not a sink"),
        AudioSpec::Wav(path) => Box::new(WavSink::create(path.clone())?),
        AudioSpec::Null => Box::new(Discard),
        #[cfg(feature = "device")]
        AudioSpec::Device(name) => Box::new(device::Playback::open(name.as_deref())?),
        #[cfg(not(feature = "device"))]
        AudioSpec::Device(_) => bail!("this build has no sound card support (feature `device`)"),
    })
}

/// A sine tone at -10 dBFS.
pub struct Tone {
    step: f64,
    phase: f64,
}

impl Tone {
    /// A tone at `hz`.
    pub fn new(hz: f32) -> Self {
        Tone {
            step: std::f64::consts::TAU * f64::from(hz) / f64::from(SAMPLE_RATE),
            phase: 0.0,
        }
    }
}

impl AudioSource for Tone {
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
        for s in out.iter_mut() {
            *s = (self.phase.sin() * 0.316 * f64::from(i16::MAX)) as i16;
            self.phase = (self.phase + self.step) % std::f64::consts::TAU;
        }
        Ok(())
    }
}

struct Silence;

impl AudioSource for Silence {
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
        out.fill(0);
        Ok(())
    }
}

struct Discard;

impl AudioSink for Discard {
    fn write_frame(&mut self, _pcm: &[i16]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A 48 kHz WAV file, looped; stereo is mixed down to mono.
pub struct WavSource {
    path: PathBuf,
    reader: hound::WavReader<BufReader<File>>,
}

impl WavSource {
    /// Opens and checks the format.
    pub fn open(path: PathBuf) -> anyhow::Result<Self> {
        let reader = hound::WavReader::open(&path)
            .with_context(|| format!("cannot open WAV file {}", path.display()))?;
        let spec = reader.spec();
        if spec.sample_rate != SAMPLE_RATE {
            bail!(
                "{} is {} Hz; call audio is 48000 Hz (convert with: sox IN -r 48000 -c 1 OUT.wav)",
                path.display(),
                spec.sample_rate
            );
        }
        if spec.channels == 0 || spec.channels > 2 {
            bail!(
                "{} has {} channels; use mono or stereo",
                path.display(),
                spec.channels
            );
        }
        if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
            bail!("{} is not 16-bit PCM", path.display());
        }
        if reader.duration() == 0 {
            bail!("{} has no audio", path.display());
        }
        Ok(WavSource { path, reader })
    }
}

impl AudioSource for WavSource {
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
        let channels = usize::from(self.reader.spec().channels);
        for s in out.iter_mut() {
            let mut acc = 0i32;
            for _ in 0..channels {
                let v = match self.reader.samples::<i16>().next() {
                    Some(v) => v?,
                    None => {
                        self.reader.seek(0)?; // loop
                        self.reader
                            .samples::<i16>()
                            .next()
                            .with_context(|| format!("{} became empty", self.path.display()))??
                    }
                };
                acc += i32::from(v);
            }
            *s = (acc / channels as i32) as i16;
        }
        Ok(())
    }
}

/// Writes a 48 kHz mono 16-bit WAV file.
pub struct WavSink {
    writer: Option<hound::WavWriter<std::io::BufWriter<File>>>,
}

impl WavSink {
    /// Creates (truncates) the file.
    pub fn create(path: PathBuf) -> anyhow::Result<Self> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(&path, spec)
            .with_context(|| format!("cannot create WAV file {}", path.display()))?;
        Ok(WavSink {
            writer: Some(writer),
        })
    }
}

impl AudioSink for WavSink {
    fn write_frame(&mut self, pcm: &[i16]) -> anyhow::Result<()> {
        if let Some(w) = self.writer.as_mut() {
            let mut w = w.get_i16_writer(pcm.len() as u32);
            for &s in pcm {
                w.write_sample(s);
            }
            w.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(w) = self.writer.take() {
            w.finalize()?;
        }
        Ok(())
    }
}

#[cfg(feature = "device")]
mod device {
    //! Sound card audio through cpal. cpal streams are not `Send`, so each lives on a
    //! thread of its own and exchanges samples through a bounded queue.

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use anyhow::{bail, Context};
    use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

    use super::{AudioSink, AudioSource, SAMPLE_RATE};

    /// At most this many samples queue between the card and the call (60 ms). The card
    /// runs on its own clock and the engine on the system's: a short cap keeps their
    /// drift from building up delay in a long call (excess is dropped, oldest first).
    const QUEUE: usize = 3 * super::FRAME;

    type Queue = Arc<Mutex<VecDeque<i16>>>;

    fn find(input: bool, name: Option<&str>) -> anyhow::Result<cpal::Device> {
        let host = cpal::default_host();
        let dev = match name {
            None if input => host.default_input_device(),
            None => host.default_output_device(),
            Some(n) => {
                let mut devices = if input {
                    host.input_devices()?
                } else {
                    host.output_devices()?
                };
                devices.find(|d| d.name().map(|x| x == n).unwrap_or(false))
            }
        };
        dev.with_context(|| {
            format!(
                "no {} sound device{}",
                if input { "input" } else { "output" },
                name.map(|n| format!(" named {n:?}")).unwrap_or_default()
            )
        })
    }

    fn config() -> cpal::StreamConfig {
        cpal::StreamConfig {
            channels: 1,
            sample_rate: cpal::SampleRate(SAMPLE_RATE),
            buffer_size: cpal::BufferSize::Default,
        }
    }

    /// Runs a stream on its own thread until `stop` is set; reports start-up errors.
    fn run_stream(
        build: impl FnOnce() -> anyhow::Result<cpal::Stream> + Send + 'static,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("audio-device".into())
            .spawn(move || {
                let stream = match build().and_then(|s| {
                    s.play()?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(std::time::Duration::from_millis(100));
                }
                drop(stream);
            })?;
        match rx.recv() {
            Ok(r) => r,
            Err(_) => bail!("audio device thread ended"),
        }
    }

    pub struct Capture {
        queue: Queue,
        stop: Arc<AtomicBool>,
    }

    impl Capture {
        pub fn open(name: Option<&str>) -> anyhow::Result<Self> {
            let device = find(true, name)?;
            let queue: Queue = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let q = Arc::clone(&queue);
            run_stream(
                move || {
                    Ok(device.build_input_stream(
                        &config(),
                        move |data: &[i16], _| {
                            if let Ok(mut q) = q.lock() {
                                q.extend(data.iter().copied());
                                let excess = q.len().saturating_sub(QUEUE);
                                q.drain(..excess);
                            }
                        },
                        |e| tracing::warn!(error = %e, "capture error"),
                        None,
                    )?)
                },
                Arc::clone(&stop),
            )?;
            Ok(Capture { queue, stop })
        }
    }

    impl AudioSource for Capture {
        fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
            let mut q = self
                .queue
                .lock()
                .map_err(|_| anyhow::anyhow!("capture queue poisoned"))?;
            for s in out.iter_mut() {
                *s = q.pop_front().unwrap_or(0);
            }
            Ok(())
        }
    }

    impl Drop for Capture {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    pub struct Playback {
        queue: Queue,
        stop: Arc<AtomicBool>,
    }

    impl Playback {
        pub fn open(name: Option<&str>) -> anyhow::Result<Self> {
            let device = find(false, name)?;
            let queue: Queue = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let q = Arc::clone(&queue);
            run_stream(
                move || {
                    Ok(device.build_output_stream(
                        &config(),
                        move |data: &mut [i16], _| {
                            if let Ok(mut q) = q.lock() {
                                for s in data.iter_mut() {
                                    *s = q.pop_front().unwrap_or(0);
                                }
                            }
                        },
                        |e| tracing::warn!(error = %e, "playback error"),
                        None,
                    )?)
                },
                Arc::clone(&stop),
            )?;
            Ok(Playback { queue, stop })
        }
    }

    impl AudioSink for Playback {
        fn write_frame(&mut self, pcm: &[i16]) -> anyhow::Result<()> {
            let mut q = self
                .queue
                .lock()
                .map_err(|_| anyhow::anyhow!("playback queue poisoned"))?;
            q.extend(pcm.iter().copied());
            let excess = q.len().saturating_sub(QUEUE);
            q.drain(..excess);
            Ok(())
        }
    }

    impl Drop for Playback {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_explained() {
        assert_eq!(
            "tone:440".parse::<AudioSpec>().unwrap(),
            AudioSpec::Tone(440.0)
        );
        assert_eq!("null".parse::<AudioSpec>().unwrap(), AudioSpec::Null);
        assert_eq!(
            "wav:/tmp/x.wav".parse::<AudioSpec>().unwrap(),
            AudioSpec::Wav("/tmp/x.wav".into())
        );
        assert_eq!(
            "device".parse::<AudioSpec>().unwrap(),
            AudioSpec::Device(None)
        );
        assert_eq!(
            "device:hw:0".parse::<AudioSpec>().unwrap(),
            AudioSpec::Device(Some("hw:0".into()))
        );
        for bad in ["tone:x", "tone:5", "wav:", "mic", ""] {
            assert!(bad.parse::<AudioSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wav_sink_and_source_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.wav");
        let mut tone = Tone::new(1000.0);
        let mut frame = vec![0i16; FRAME];
        let mut sink = WavSink::create(path.clone()).unwrap();
        let mut written = Vec::new();
        for _ in 0..3 {
            tone.read_frame(&mut frame).unwrap();
            sink.write_frame(&frame).unwrap();
            written.extend_from_slice(&frame);
        }
        sink.finish().unwrap();
        let mut src = WavSource::open(path).unwrap();
        let mut read = Vec::new();
        for _ in 0..4 {
            src.read_frame(&mut frame).unwrap();
            read.extend_from_slice(&frame);
        }
        assert_eq!(&read[..3 * FRAME], &written[..]);
        assert_eq!(&read[3 * FRAME..], &written[..FRAME], "loops at the end");
    }

    #[test]
    fn wrong_rate_wav_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("8k.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        w.write_sample(0i16).unwrap();
        w.finalize().unwrap();
        let err = WavSource::open(path).err().unwrap().to_string();
        assert!(err.contains("48000"), "{err}");
    }
}
