"""Installs ``torchvision_cpu_shim.pth`` at the root of site-packages beside the module."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "torchvision_cpu_shim.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(self.build_lib) / PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
