"""Every `.venv/bin/<tool>` the README tells a user to run is installed by the README's own install line."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# executables that come with Python or with a pinned package of another name
BUILTIN = {"python", "python3", "pip"}


def read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_readme_tools_are_pinned_in_requirements():
  pinned = {re.split(r"[=<>~\[]", line)[0].strip().lower() for line in read("requirements.txt").splitlines()
            if line.strip() and not line.startswith("#")}
  tools = set(re.findall(r"\.venv/bin/([A-Za-z0-9_\-]+)", read("README.md"))) - BUILTIN
  assert "tensorboard" in tools  # the TensorBoard hint
  assert tools <= pinned, sorted(tools - pinned)
  assert re.search(r"^tensorboard==\d+\.\d+\.\d+$", read("requirements.txt"), re.M)
