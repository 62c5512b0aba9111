"""Camera frames labelled success / failure, for training a reward classifier.

Two producers fill one format:

- **Operator marks (real robot).** The teleop / operator-event code owns a
  :class:`LabelledFrameRecorder` and calls ``recorder.add(frames, label, source)`` whenever the
  operator marks the current view as a success or a failure (``frames`` maps camera name ->
  ``uint8 H x W x 3``; :meth:`LabelledFrameRecorder.add_observation` takes a whole observation and
  picks its ``images/<camera>`` fields), ``recorder.end_episode()`` between episodes and
  ``recorder.save(directory)`` when done (or periodically: every save is a complete snapshot).
- **The simulator.** :func:`record_sim_success_fail` drives the robot with the scripted expert mixed
  with noise and random actions and labels every frame with the simulator's own success flag
  (``info["success"]``), see below. ``steerl record-success-fail`` runs it.

Sim collection
==============

Each episode is *expert-driven* with probability ``expert_share`` (the scripted expert, with
Gaussian action noise ``expert_noise``), otherwise *exploring*: every step takes a uniform random
action with probability ``random_action_share`` and the expert's action otherwise (these episodes
mostly fail, after wandering near the task). From each episode the recorder keeps

- every *success* frame (steps whose ``info["success"]`` is 1; the cell ends the episode on success,
  so there is one per successful episode);
- the ``near_miss_steps`` failure frames right before each success (hard negatives: the grasp is
  closed but the cube is not high enough yet, the goal is a few centimetres away); and
- ``failures_per_episode`` further failure frames drawn uniformly without replacement from the
  episode's remaining steps.

Frames are kept per episode (``episode`` ids), so that a held-out split can be made by episode and
near-identical consecutive frames never straddle it.

On-disk format (version 1)
==========================

``save(path)`` writes a directory readable with numpy and json alone (no pickle)::

    path/
      meta.json               # see below
      images.<camera>.npy     # uint8 [N, H, W, 3], one file per camera, frame i of every file
                              #   was taken at the same instant
      labels.npy              # bool [N]: True = success
      episodes.npy            # int64 [N]: episode id (the unit of the held-out split)
      steps.npy               # int64 [N]: step within the episode (-1: unknown)
      sources.npy             # unicode [N]: who labelled the frame ("sim_success_flag", "operator", ...)

``meta.json``: ``format`` (``"steerl.labelled_frames"``), ``format_version`` (1), ``cameras``
(``{name: {"file", "shape": [H, W, 3]}}``), ``counts`` (``frames``, ``success``, ``failure``,
``episodes``), ``sources`` (source -> frame count), ``config_name``, ``saved_at``, and ``recording``
(free-form settings of the producer, e.g. the sim collection options). Camera names are plain
identifiers (the config validates them), so they are safe file-name parts.

Reading it in a notebook::

    labels = np.load(f"{path}/labels.npy")
    front = np.load(f"{path}/images.front.npy", mmap_mode="r")
    success_front = front[labels]

**Crash safety.** ``save`` writes everything into the sibling ``path.tmp`` (each file fsynced,
``meta.json`` last), renames an existing ``path`` to ``path.old``, renames ``path.tmp`` to ``path``
and only then removes ``path.old``: a crash leaves ``path`` or ``path.old`` complete.
:func:`load_labelled_frames` reads ``path`` (or ``path.old`` when ``path`` is missing) and checks
every file against ``meta.json``; errors name the file.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learner.durable import write_directory_atomically, write_durably

log = logging.getLogger("steerl.actor.labelled_frames")

FORMAT_NAME = "steerl.labelled_frames"
FORMAT_VERSION = 1
IMAGE_PREFIX = "images/"
SIM_SOURCE = "sim_success_flag"
OPERATOR_SOURCE = "operator"


class LabelledFramesError(ValueError):
    """A labelled-frame directory, or a frame added to a recorder, is not what the format requires."""


def camera_file(camera: str) -> str:
    """The ``.npy`` file name of a camera's frames."""
    return f"images.{camera}.npy"


@dataclass
class LabelledFrames:
    """A loaded labelled-frame set: ``images[camera]`` is ``uint8 [N, H, W, 3]`` and ``labels``,
    ``episodes``, ``steps``, ``sources`` are ``[N]``."""

    images: dict[str, np.ndarray]
    labels: np.ndarray
    episodes: np.ndarray
    steps: np.ndarray
    sources: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.images)

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {camera: tuple(frames.shape[1:]) for camera, frames in self.images.items()}  # type: ignore[misc]


class LabelledFrameRecorder:
    """Collects labelled camera frames in memory and saves them in the format of the module docstring.

    Args:
        cameras: camera name -> ``(H, W, 3)``; ``None`` takes them from the first ``add``.
        config_name: the session config the frames come from (written to ``meta.json``).
        recording: free-form producer settings written to ``meta.json`` (JSON-serialisable).
    """

    def __init__(self, cameras: Mapping[str, Sequence[int]] | None = None, config_name: str = "",
                 recording: Mapping[str, Any] | None = None) -> None:
        self.cameras: dict[str, tuple[int, ...]] | None = (
            None if cameras is None else {name: tuple(int(n) for n in shape) for name, shape in cameras.items()})
        if self.cameras is not None:
            for name, shape in self.cameras.items():
                self._check_camera(name, shape)
        self.config_name = config_name
        self.recording = dict(recording or {})
        self._frames: dict[str, list[np.ndarray]] = {name: [] for name in (self.cameras or {})}
        self._labels: list[bool] = []
        self._episodes: list[int] = []
        self._steps: list[int] = []
        self._sources: list[str] = []
        self.episode = 0

    @classmethod
    def for_observation_space(cls, observation_space, config_name: str = "",
                              recording: Mapping[str, Any] | None = None) -> "LabelledFrameRecorder":
        """A recorder for every ``images/<camera>`` field of a gymnasium ``Dict`` observation space."""
        cameras = {key[len(IMAGE_PREFIX):]: tuple(box.shape) for key, box in observation_space.spaces.items()
                   if key.startswith(IMAGE_PREFIX)}
        if not cameras:
            raise LabelledFramesError(f"the observation space has no camera fields ({IMAGE_PREFIX}<name>); "
                                      f"its fields: {sorted(observation_space.spaces)}")
        return cls(cameras, config_name, recording)

    @staticmethod
    def _check_camera(name: str, shape: Sequence[int]) -> None:
        if not name.isidentifier():
            raise LabelledFramesError(f"camera name {name!r} must be a plain identifier")
        if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
            raise LabelledFramesError(f"camera {name!r}: frames must be H x W x 3, got shape {tuple(shape)}")

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def counts(self) -> dict[str, int]:
        """``frames``, ``success``, ``failure`` and ``episodes`` recorded so far."""
        success = int(sum(self._labels))
        return {"frames": len(self._labels), "success": success, "failure": len(self._labels) - success,
                "episodes": len(set(self._episodes))}

    def add(self, frames: Mapping[str, np.ndarray], label: bool, source: str, episode: int | None = None,
            step: int = -1) -> None:
        """Record one labelled instant: ``frames`` maps every camera name to a ``uint8 H x W x 3``
        image (copied); ``label`` is True for success; ``source`` says who labelled it
        (``"operator"``, ``"sim_success_flag"``...); ``episode`` defaults to the recorder's current
        episode (see :meth:`end_episode`). Nothing is recorded when a frame is wrong."""
        if not isinstance(source, str) or not source:
            raise LabelledFramesError("source must be a non-empty string (e.g. 'operator')")
        cameras = self.cameras
        if cameras is None:  # the first frame fixes the cameras
            if not frames:
                raise LabelledFramesError("frames must hold at least one camera")
            for name, image in frames.items():
                self._check_camera(name, np.shape(image))
            cameras = {name: tuple(np.shape(image)) for name, image in frames.items()}
        missing = sorted(set(cameras) - set(frames))
        extra = sorted(set(frames) - set(cameras))
        if missing or extra:
            raise LabelledFramesError(f"frames must hold exactly the cameras {sorted(cameras)}; "
                                      f"missing {missing}, unexpected {extra}")
        checked = {}
        for name, expected in cameras.items():
            image = np.asarray(frames[name])
            if image.dtype != np.uint8 or image.shape != expected:
                raise LabelledFramesError(f"camera {name!r}: expected a uint8 frame of shape {expected}, "
                                          f"got {image.dtype} {image.shape}")
            checked[name] = np.array(image, copy=True)
        if self.cameras is None:
            self.cameras = cameras
            self._frames = {name: [] for name in cameras}
        for name, image in checked.items():
            self._frames[name].append(image)
        self._labels.append(bool(label))
        self._episodes.append(self.episode if episode is None else int(episode))
        self._steps.append(int(step))
        self._sources.append(source)

    def add_observation(self, observation: Mapping[str, np.ndarray], label: bool, source: str,
                        episode: int | None = None, step: int = -1) -> None:
        """:meth:`add` with the ``images/<camera>`` fields of an env observation (other fields ignored)."""
        frames = {key[len(IMAGE_PREFIX):]: value for key, value in observation.items() if key.startswith(IMAGE_PREFIX)}
        self.add(frames, label, source, episode, step)

    def end_episode(self) -> int:
        """Start a new episode id for the following frames; returns it."""
        self.episode += 1
        return self.episode

    def arrays(self) -> LabelledFrames:
        """The frames recorded so far as arrays (copies)."""
        if self.cameras is None:
            raise LabelledFramesError("no frames recorded yet")
        images = {name: np.stack(frames) if frames else np.zeros((0, *self.cameras[name]), np.uint8)
                  for name, frames in self._frames.items()}
        return LabelledFrames(images, np.asarray(self._labels, dtype=bool), np.asarray(self._episodes, dtype=np.int64),
                              np.asarray(self._steps, dtype=np.int64), np.asarray(self._sources, dtype=np.str_))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write everything recorded so far to ``directory`` (crash-safe; format in the module docstring)."""
        data = self.arrays()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "cameras": {name: {"file": camera_file(name), "shape": list(shape)} for name, shape in self.cameras.items()},
            "counts": self.counts,
            "sources": dict(Counter(self._sources)),
            "config_name": self.config_name,
            "recording": self.recording,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        arrays = {camera_file(name): frames for name, frames in data.images.items()}
        arrays.update({"labels.npy": data.labels, "episodes.npy": data.episodes, "steps.npy": data.steps,
                       "sources.npy": data.sources})
        return _write_directory(Path(directory), arrays, meta)


def _write_directory(final: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` (``.npy``) and ``meta.json`` into ``final`` crash-safely (learner/durable.py)."""

    def write(tmp: Path) -> None:
        for name, array in arrays.items():
            with open(tmp / name, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        write_durably(tmp / "meta.json", json.dumps(meta, indent=1).encode())

    return write_directory_atomically(final, write)


def _load_array(path: Path, dtype_kind: str, length: int | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise LabelledFramesError(f"{path}: cannot read: {error}") from None
    if array.dtype.kind != dtype_kind:
        raise LabelledFramesError(f"{path}: expected dtype kind {dtype_kind!r}, got {array.dtype}")
    if length is not None and len(array) != length:
        raise LabelledFramesError(f"{path}: holds {len(array)} rows, labels.npy holds {length}")
    return array


def load_labelled_frames(directory: str | os.PathLike) -> LabelledFrames:
    """Read a directory written by :meth:`LabelledFrameRecorder.save` (or its ``.old`` copy when the
    directory itself is missing after a crash); every file is checked against ``meta.json``."""
    path = Path(directory)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
        log.warning("%s is missing; reading the previous complete copy %s", directory, path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise LabelledFramesError(f"{meta_path}: cannot read labelled-frame metadata: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise LabelledFramesError(f"{meta_path}: not a {FORMAT_NAME} directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LabelledFramesError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    labels = _load_array(path / "labels.npy", "b", None)
    count = len(labels)
    episodes = _load_array(path / "episodes.npy", "i", count)
    steps = _load_array(path / "steps.npy", "i", count)
    sources = _load_array(path / "sources.npy", "U", count)
    images = {}
    for name, entry in sorted(meta.get("cameras", {}).items()):
        file = path / entry["file"]
        frames = _load_array(file, "u", count)
        if frames.dtype != np.uint8 or list(frames.shape[1:]) != list(entry["shape"]):
            raise LabelledFramesError(f"{file}: camera {name!r} should hold uint8 frames of shape "
                                      f"{tuple(entry['shape'])}, holds {frames.dtype} {frames.shape[1:]}")
        images[name] = frames
    if not images:
        raise LabelledFramesError(f"{meta_path}: lists no cameras")
    return LabelledFrames(images, labels, episodes, steps, sources, meta)


def concatenate_labelled_frames(parts: Sequence[LabelledFrames]) -> LabelledFrames:
    """One set from several (e.g. a sim recording and operator marks); episode ids are renumbered
    so that episodes of different parts stay distinct. Cameras and shapes must agree."""
    if not parts:
        raise LabelledFramesError("no labelled-frame sets given")
    shapes = parts[0].image_shapes
    for index, part in enumerate(parts[1:], start=1):
        if part.image_shapes != shapes:
            raise LabelledFramesError(f"labelled-frame set {index} has cameras {part.image_shapes}, "
                                      f"set 0 has {shapes}")
    episodes, offset = [], 0
    for part in parts:
        _, renumbered = np.unique(part.episodes, return_inverse=True)
        episodes.append(renumbered.astype(np.int64) + offset)
        offset += int(renumbered.max()) + 1 if len(renumbered) else 0
    return LabelledFrames(
        {camera: np.concatenate([part.images[camera] for part in parts]) for camera in shapes},
        np.concatenate([part.labels for part in parts]), np.concatenate(episodes),
        np.concatenate([part.steps for part in parts]), np.concatenate([part.sources for part in parts]),
        {"parts": [part.meta for part in parts]})


@dataclass(frozen=True)
class SimCollection:
    """Settings of :func:`record_sim_success_fail` (see the module docstring)."""

    expert_share: float = 0.6
    expert_noise: float = 0.1
    random_action_share: float = 0.5
    near_miss_steps: int = 2
    failures_per_episode: int = 2
    # End an episode after this many steps (None: the task's own time limit).
    max_episode_steps: int | None = None

    def validate(self) -> None:
        for name in ("expert_share", "random_action_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.expert_noise < 0 or self.near_miss_steps < 0 or self.failures_per_episode < 0:
            raise ValueError("expert_noise, near_miss_steps and failures_per_episode must be non-negative")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be at least 1")


def record_sim_success_fail(env, expert_act: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                            recorder: LabelledFrameRecorder, episodes: int, seed: int,
                            settings: SimCollection = SimCollection(),
                            on_episode: Callable[[int, bool, int], None] | None = None) -> dict[str, int]:
    """Drive ``env`` for ``episodes`` episodes (expert-driven or exploring, see the module
    docstring) and add the kept frames to ``recorder``, labelled with ``info["success"]``.
    ``expert_act`` should add ``settings.expert_noise`` itself (``ScriptedExpert(noise_std=...)``).
    ``on_episode(index, success, kept_frames)`` reports progress. Returns ``recorder.counts``."""
    settings.validate()
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    for index in range(episodes):
        expert_driven = bool(rng.random() < settings.expert_share)
        observation, _ = env.reset(seed=seed + index)
        frames: list[Mapping[str, np.ndarray]] = []
        successes: list[bool] = []
        step = 0
        while True:
            if expert_driven or rng.random() >= settings.random_action_share:
                action = expert_act(observation)
            else:
                action = env.action_space.sample()
            observation, _, terminated, truncated, info = env.step(action)
            step += 1
            frames.append({key: value for key, value in observation.items() if key.startswith(IMAGE_PREFIX)})
            successes.append(bool(info.get("success", 0.0)))
            limit = settings.max_episode_steps
            if terminated or truncated or (limit is not None and step >= limit):
                break
        success_steps = [i for i, success in enumerate(successes) if success]
        near_misses = sorted({j for i in success_steps for j in range(max(0, i - settings.near_miss_steps), i)
                              if not successes[j]})
        others = [i for i, success in enumerate(successes) if not success and i not in near_misses]
        drawn = rng.choice(others, size=min(settings.failures_per_episode, len(others)), replace=False).tolist() \
            if others else []
        kept = sorted(success_steps + near_misses + drawn)
        for i in kept:
            recorder.add_observation(frames[i], successes[i], SIM_SOURCE, episode=recorder.episode, step=i + 1)
        recorder.end_episode()
        if on_episode is not None:
            on_episode(index, bool(success_steps), len(kept))
    return recorder.counts


def record_success_fail(config, episodes: int, out: str | os.PathLike, settings: SimCollection = SimCollection(),
                        seed: int | None = None, start_server: bool = True,
                        log_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``steerl record-success-fail``: run :func:`record_sim_success_fail` on the simulated robot of
    ``config`` (a robot server child is started for a ``zmq`` link unless ``start_server`` is
    False) and save the frames to ``out``. Returns the counts and the path."""
    from contextlib import ExitStack
    from dataclasses import asdict, replace

    from actor.rollout import connect_env, robot_server_process
    from policies.scripted import ScriptedExpert

    say = log_line or log.info
    if config.robot.backend != "pybullet":
        raise LabelledFramesError(
            f"record-success-fail labels frames with the simulator's success flag, and robot.backend is "
            f"{config.robot.backend!r}; on a real robot, label frames with operator marks "
            "(LabelledFrameRecorder.add from the teleop / operator-event code)")
    if not config.robot.cameras:
        raise LabelledFramesError(f"config {config.name!r} has no cameras (robot.cameras): nothing to record")
    if not config.robot.task.privileged_state:
        # The scripted expert acts from the simulator's task/... state; the frames are all that is kept.
        say("enabling robot.task.privileged_state for the scripted expert (only camera frames are recorded)")
        config = replace(config, robot=replace(config.robot, task=replace(config.robot.task, privileged_state=True)))
    seed = config.seed if seed is None else seed
    settings.validate()
    with ExitStack() as stack:
        server = None
        if start_server and config.env.connection == "zmq":
            server = stack.enter_context(robot_server_process(config))
        env = connect_env(config, server)
        stack.callback(env.close)
        recorder = LabelledFrameRecorder.for_observation_space(
            env.observation_space, config.name,
            recording={"producer": "steerl record-success-fail", "episodes": episodes, "seed": seed,
                       "task": config.robot.task.name, **asdict(settings)})
        expert = ScriptedExpert(config.robot, noise_std=settings.expert_noise, seed=seed)

        def report(index: int, success: bool, kept: int) -> None:
            counts = recorder.counts
            say(f"episode {index + 1}/{episodes}: {'success' if success else 'no success'}, kept {kept} frames "
                f"(total {counts['success']} success / {counts['failure']} failure)")

        counts = record_sim_success_fail(env, expert.act, recorder, episodes, seed, settings, on_episode=report)
    path = recorder.save(out)
    return {**counts, "path": str(path)}
