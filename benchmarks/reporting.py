"""What every benchmark does with its report."""
from __future__ import annotations

import json
import os


def write_report(path: str, report: dict) -> None:
  """Writes the report as indented JSON (creating the directory) and says where."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  wall = report.get("wall_s")
  print(f"wrote {path}" + (f" ({wall:.0f}s)" if isinstance(wall, (int, float)) else ""))
