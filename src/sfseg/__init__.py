"""sfseg: Specialize and Fuse (ICCV 2021) on Lightning + Hydra."""

from pathlib import Path

# The Hydra config tree (`conf/` at the repository root; the package is installed editable).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
