"""FLUX.1 [schnell] for ComfyUI: node mappings.

ComfyUI imports this file from `custom_nodes/<folder>/__init__.py`; pip installs the same folder as
`comfyui_flux_schnell`. Importing it is cheap: torch, the network code and HTTP are loaded only when
a node runs.
"""

from ._version import __version__
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
