"""Where models come from: the Hugging Face cache (offline), ModelScope's optional dependency, the demo."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def download(model: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmserve", "download", model], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, **env})


def test_hub_id_resolves_from_the_local_cache_offline(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vl"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_qwen2_vl, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    done = download("acme/tiny-vl", {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshot


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    done = download("acme/not-here", {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    assert "not in the local Hugging Face cache" in done.stderr and "Traceback" not in done.stderr


def test_modelscope_without_its_package_says_how_to_install_it() -> None:
    if importlib.util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed here")
    done = download("modelscope:ZhipuAI/glm-4v-9b", {})
    assert done.returncode == 1
    assert "pip install 'vlmserve[modelscope]'" in done.stderr


def test_missing_local_directory_is_a_clear_error() -> None:
    done = download("./no/such/model", {})
    assert done.returncode == 1 and "no such model directory" in done.stderr
