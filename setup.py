"""steerl: a real-robot reinforcement-learning control stack (robot server, actor, learner)."""

from setuptools import setup

PACKAGES = [
    "actor",
    "learner",
    "policies",
    "robot_server",
    "robot_server.backends",
    "transport",
    "hardware_configs",
    "tools",
    "tools.dashboard",
]

setup(
    name="steerl",
    version="0.1.0",
    description="Real-robot RL control stack: ZeroMQ robot server, gymnasium actor, SAC/RLPD learner",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={"hardware_configs": ["*.yaml", "teleop/*.yaml"], "transport": ["*.proto"],
                  "tools.dashboard": ["static/*"]},
    install_requires=[
        "numpy>=1.26",
        "torch>=2.13",
        "pyzmq>=26",
        "protobuf>=7.35,<8",
        "gymnasium>=1.0",
        "pybullet>=3.2.6",
        "pyyaml>=6",
        "opencv-python-headless>=4.9",
        "pyrealsense2>=2.55",
        "safetensors>=0.4",
        "rich>=13",
        "tensorboard>=2.14",
        # Teleop devices (actor/teleop.py): gamepads through pygame's joystick API, SpaceMouse raw HID.
        "pygame>=2.5",
        "hidapi>=0.14",
        # Generalist policies (policies/): the OpenVLA adapter loads checkpoints through
        # transformers; the diffusion policy uses the diffusers noise schedulers. transformers 5.25 loads an
        # image processor only when its class declares `valid_kwargs`, which OpenVLA's published remote code
        # (PrismaticImageProcessor) does not: below 5.25 until the checkpoints catch up.
        "transformers>=5.0,<5.25",
        "diffusers>=0.35",
        # PA-RL (learner/parl.py) fine-tunes OpenVLA through LoRA adapters (pulls in accelerate).
        "peft>=0.21",
        # steerl train --ray (tools/ray_session.py): learner, simulated actors, policy server as Ray actors.
        "ray>=2.50",
        # The operator console (tools/dashboard): a FastAPI app under uvicorn, WebSockets via websockets.
        "fastapi>=0.115",
        "uvicorn>=0.30",
        "websockets>=13",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            # The generated transport/steerl_pb2.py is checked against this exact protoc.
            "grpcio-tools==1.85.1",
            # HTTP/JSON baseline of benchmarks/robot_link.py (shaped like SERL's Franka server).
            "flask>=3",
            # The dashboard's end-to-end tests drive Debian's chromium (/usr/bin/chromium) with Playwright.
            "playwright>=1.50",
            # The arm vendor libraries, pinned: tests/test_arm_backends.py checks the fakes the
            # backend tests use against their exact API. Prebuilt Linux wheels (a few MB, no build;
            # franky-control needs glibc >= 2.34); elsewhere those checks are skipped.
            "franky-control==2.0.0; sys_platform == 'linux'",
            "ur-rtde==1.6.5; sys_platform == 'linux'",
        ],
        # Real arms: robot.backend franka (franky) or ur (ur_rtde); imported only when chosen.
        "hardware": [
            "franky-control>=2.0,<3",
            "ur-rtde>=1.6.5,<2",
        ],
    },
    entry_points={"console_scripts": ["steerl=tools.cli:main"]},
)
