"""Episode videos for the operator: the camera images the actor already receives, as MP4 files.

:class:`EpisodeVideoRecorder` writes every ``every``-th episode's frames, one file per camera
(observation fields ``images/<camera>``, uint8 HxWx3 RGB or HxW / HxWx1 grey), with OpenCV's
``VideoWriter`` and the ``mp4v`` codec at the control rate. Nothing is rendered: the frames are the
observations of the reset and of every step. A file is written as
``episode-<n>-<camera>.partial.mp4`` while the episode runs and renamed to
``episode-<n>-<camera>-<outcome>.mp4`` when it ends (outcome: ``success``, ``failure``,
``discarded``...); an episode that is restarted before its first step leaves no file. Without image
fields the recorder does nothing (and says so once).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("steerl.actor")

IMAGE_PREFIX = "images/"


def image_fields(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Camera name -> image of the ``images/<camera>`` fields of an observation."""
    return {key[len(IMAGE_PREFIX):]: value for key, value in observation.items()
            if key.startswith(IMAGE_PREFIX) and np.asarray(value).dtype == np.uint8}


def _bgr(image: np.ndarray) -> np.ndarray:
    """An HxWx3 BGR uint8 frame (what OpenCV writes) from an RGB or grey image."""
    import cv2

    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(np.ascontiguousarray(image.reshape(image.shape[:2])), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2BGR)


class EpisodeVideoRecorder:
    """See the module docstring. ``directory`` is created on the first file; ``fps`` is the control rate."""

    def __init__(self, directory: str | Path, every: int, fps: float) -> None:
        if every < 1:
            raise ValueError(f"save_videos: every must be a positive number of episodes, got {every}")
        self.directory = Path(directory)
        self.every = every
        self.fps = float(fps)
        self.saved: list[Path] = []
        self._episode: int | None = None
        self._writers: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}
        self._frames = 0
        self._warned_no_images = False
        self._failed = False

    def wants(self, episode: int) -> bool:
        """Whether episode number ``episode`` is recorded (every ``every``-th, starting with 0)."""
        return not self._failed and episode % self.every == 0

    @property
    def recording(self) -> bool:
        return self._episode is not None

    def begin(self, episode: int) -> None:
        """Start recording ``episode`` (a recording still open is dropped: the episode restarted)."""
        self.abort()
        if self.wants(episode):
            self._episode = episode

    def add(self, observation: dict[str, np.ndarray]) -> None:
        """Append this observation's camera images (no-op when not recording)."""
        if self._episode is None:
            return
        images = image_fields(observation)
        if not images:
            if not self._warned_no_images:
                log.warning("--save-videos: the observation has no camera images (images/<camera>); no videos")
                self._warned_no_images = True
            return
        for camera, image in images.items():
            writer = self._writers.get(camera)
            if writer is None:
                writer = self._open(camera, image)
                if writer is None:
                    return
            writer.write(_bgr(image))
        self._frames += 1

    def _open(self, camera: str, image: np.ndarray) -> Any:
        import cv2

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"episode-{self._episode:06d}-{_safe(camera)}.partial.mp4"
        height, width = image.shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (int(width), int(height)),
                                 True)
        if not writer.isOpened():
            log.error("--save-videos: OpenCV cannot write an mp4v video to %s; no more videos", path)
            self._failed = True
            self.abort()
            return None
        self._writers[camera] = writer
        self._paths[camera] = path
        return writer

    def end(self, outcome: str) -> list[Path]:
        """Close the episode's files, named with ``outcome``; returns their paths."""
        written = []
        for camera, writer in self._writers.items():
            writer.release()
            partial = self._paths[camera]
            final = partial.with_name(partial.name.replace(".partial.mp4", f"-{_safe(outcome)}.mp4"))
            partial.replace(final)
            written.append(final)
        if written:
            log.info("episode %d: %d frames saved to %s", self._episode, self._frames,
                     ", ".join(str(path) for path in written))
        self.saved += written
        self._writers, self._paths, self._episode, self._frames = {}, {}, None, 0
        return written

    def abort(self) -> None:
        """Drop the recording in progress (its partial files are deleted)."""
        for camera, writer in self._writers.items():
            writer.release()
            self._paths[camera].unlink(missing_ok=True)
        self._writers, self._paths, self._episode, self._frames = {}, {}, None, 0

    def close(self) -> None:
        """Drop an unfinished recording."""
        self.abort()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
