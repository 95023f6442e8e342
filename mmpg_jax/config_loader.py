"""Configs built on another config file: `load("moving_digits_qa.py", arg, folder)` runs a
sibling file's `get_config(arg)`; `module(...)` gives the file's module (its helpers). Config
files are loaded by path, as --config loads them, not imported as a package."""
import importlib.util
import os


def module(name: str, folder: str | None = None):
  """The module of configs/<name> (or of <folder>/<name>)."""
  folder = folder or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs")
  spec = importlib.util.spec_from_file_location(f"mmpg_config_{name[:-3]}",
                                                os.path.join(folder, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(name: str, arg: str = "", folder: str | None = None):
  """`get_config(arg)` of configs/<name> (or of <folder>/<name>)."""
  return module(name, folder).get_config(arg)
