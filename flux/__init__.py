"""FLUX.1 [schnell] in pure PyTorch: the networks, their weight loading, and sampling.

- `model.py`, `layers.py`, `rope.py`: the flow transformer (`Flux`, `FluxParams`);
- `autoencoder.py`: the autoencoder (`AutoEncoder`, `AutoEncoderParams`);
- `t5.py`, `clip.py`, `tokenizers.py`, `conditioning.py`: the text encoders and prompt encoding;
- `checkpoint.py`, `loading.py`: weight files to modules (memory-mapped, config from shapes);
- `sampling.py`, `preview.py`: noise, schedule, Euler steps, decoding, latent previews;
- `ops.py`: layers that compute in their input's dtype whatever dtype their weights are stored in;
- `lora.py`, `lora_keys.py`, `lora_adapter.py`: LoRA files matched to the layers and added at run time.

Importing this package imports torch; the node package imports it only when the local backend runs.
"""

from .autoencoder import AutoEncoder, AutoEncoderParams
from .model import Flux, FluxParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "Flux", "FluxParams"]
