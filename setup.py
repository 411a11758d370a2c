"""Ship the top-level tasks/ folder inside the wheel as florence_kit/builtin_tasks/.

Everything else is in pyproject.toml. The registry looks for florence_kit/builtin_tasks first (an
installed wheel) and falls back to tasks/ beside the package (a checkout or an editable install).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TASKS = Path(__file__).parent / "tasks"


class BuildWithTasks(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads tasks/ in place
        target = Path(self.build_lib) / "florence_kit" / "builtin_tasks"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(TASKS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithTasks})
