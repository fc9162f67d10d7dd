"""The Comfy Registry reads this package through comfy-cli's own pyproject parser (the one
`comfy node publish` runs): the version, the OS and GPU classifiers, the ComfyUI requirement."""

from __future__ import annotations

from pathlib import Path

from comfy_cli.registry.config_parser import extract_node_configuration
from comfyui_flux_schnell._version import __version__

REPO = Path(__file__).resolve().parents[1]


def test_comfy_cli_reads_the_version_and_the_classifiers():
    config = extract_node_configuration(str(REPO / "pyproject.toml"))
    assert config is not None
    assert config.project.version == __version__  # not "", which publish refuses
    assert config.project.name == "comfyui-flux-schnell"
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_comfyui_version == ">=0.3.45"
    assert config.tool_comfy.publisher_id == "flux-schnell-nodes"
