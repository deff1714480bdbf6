"""Shared test helpers: loading the committed Serve configs and making stand-in checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def app_args(config_file: str) -> dict[str, Any]:
    """The `args` of the (single) application in a committed Serve config file."""
    serve_config = yaml.safe_load((CONFIGS / config_file).read_text())
    (application,) = serve_config["applications"]
    return application["args"]


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """A directory with just a config.json: enough for config validation, no weights."""

    def make(name: str = "ckpt", heads: int = 4, kv_heads: int = 2) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(
            json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        )
        return str(path)

    return make
