"""Packaging (metadata in pyproject.toml): `pip install .` installs pipeinfer, the pipeinfer-eval
command (python -m pipeinfer.evaluate), and pipeinfer_lmeval.pth, a one-line file that lets
`lm_eval --model pipeinfer` find the model (pipeinfer/evaluate/plugin.py says how)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPth(build_py):
    """The .pth file goes beside the package, at the top of site-packages, where Python reads it."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, "pipeinfer_lmeval.pth"), "w") as f:
            f.write("import pipeinfer.evaluate.plugin\n")


setup(cmdclass={"build_py": BuildWithPth})
