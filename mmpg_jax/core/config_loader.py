"""Config files by path: `module("common.py", folder)` gives a sibling file's module (how each
experiment config gets the shared blocks of configs/common.py and common_data.py);
`load(name, arg, folder)` runs a config file's `get_config(arg)`. Config files are loaded by
path, as --config loads them, not imported as a package."""
import importlib.util
import os

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def module(name: str, folder: str | None = None):
  """The module of configs/<name> (or of <folder>/<name>)."""
  folder = folder or os.path.join(_REPO, "configs")
  spec = importlib.util.spec_from_file_location(f"mmpg_config_{name[:-3]}",
                                                os.path.join(folder, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(name: str, arg: str = "", folder: str | None = None):
  """`get_config(arg)` of configs/<name> (or of <folder>/<name>)."""
  return module(name, folder).get_config(arg)
