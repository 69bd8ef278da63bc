from setuptools import setup

from saltpeter import __version__

setup(
    name="saltpeter",
    version=__version__,
    description="Distributed cron for SaltStack fleets, with live job output over WebSocket",
    packages=["saltpeter", "saltpeter.executors", "wrapper"],
    package_data={"saltpeter": ["ui/*"]},
    python_requires=">=3.11",
    install_requires=[
        "websockets>=15.0",
        "tornado>=6.3",
        "crontab>=1.0.1",
        "PyYAML>=6.0",
    ],
    extras_require={
        # Salt is needed on the master for real fleets; --local runs without it.
        "salt": ["salt>=3006"],
        "elasticsearch": ["elasticsearch"],
        "opensearch": ["opensearch-py"],
        "test": ["pytest", "hypothesis"],
    },
    entry_points={
        "console_scripts": [
            "saltpeter = saltpeter.daemon:main",
            "sp-wrapper = wrapper.runner:main",
        ],
    },
)
