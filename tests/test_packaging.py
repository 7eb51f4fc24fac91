"""setup.py: the console scripts point at callables and the extras name what the code imports."""

import ast
import importlib
import pathlib

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"


def _setup_kwargs() -> dict:
  tree = ast.parse(SETUP.read_text())
  call = next(node for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
  return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
          if kw.arg in ("entry_points", "extras_require")}


def test_console_scripts_resolve_to_callables():
  scripts = dict(line.replace(" ", "").split("=")
                 for line in _setup_kwargs()["entry_points"]["console_scripts"])
  assert set(scripts) == {"mobilebert-jax", "mobilebert-jax-convert", "mobilebert-jax-predict"}
  for name, target in scripts.items():
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr, None)), f"{name} -> {target}"


def test_tensorboard_extra():
  extras = _setup_kwargs()["extras_require"]
  assert {"tensorboard", "tensorboardX"} <= set(extras["tensorboard"])
  assert {"test", "tfds"} <= set(extras)
