"""LoRA files applied to the loaded networks: read, matched to layers, attached as run-time updates.

- `read_lora(path)` reads a LoRA safetensors file (header checked first: a GGUF, a pickle, a
  truncated file or a full model is named as such) into its modules: alias -> down, up, alpha.
  The key formats are those of `flux.lora_keys` (kohya, diffusers / PEFT, BFL / ComfyUI names).
- `plan_lora(lora, networks)` matches every module to a layer of the given networks and checks the
  shapes. A LoRA that fits nothing is refused naming the file and what it looks like; keys that
  match no layer, or shapes that do not fit, fail saying how many and which: a LoRA is applied
  whole or not at all.
- `apply_loras(networks, [(lora, strength), ...], dtype)` removes any LoRAs the networks had and
  attaches the new ones (stacked) to their `flux.ops.Linear` layers as `LowRankAdapter`s. Each
  update is `strength * alpha / rank * up @ down` (no alpha: alpha = rank, scale 1; a PEFT file's
  `lora_alpha` / `alpha_pattern` / `use_rslora` metadata, as diffusers saves it, is honoured). The
  stored weights are not touched (so fp8, scaled fp8 and GGUF bases get exactly the update of
  their dequantized weights), and changing LoRAs or strengths reads no base weight file.
- `remove_loras(networks)`, `move_loras(module, device)`: detach; place beside moved weights.

Facts about the formats and the scale rule: ComfyUI's `comfy/lora.py`
(https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/lora.py), diffusers'
`lora_conversion_utils.py` and PEFT's `LoraLayer.update_layer` (https://github.com/huggingface/peft).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from . import lora_keys
from .checkpoint import SAFETENSORS_DTYPES, Header, TensorEntry, inspect_file, list_keys, read_header
from .components import CLIP, TRANSFORMER
from .lora_adapter import LowRankAdapter, LowRankPiece
from .ops import Linear

LORA_TITLE = "FLUX.1 LoRA"
SHOWN = 5  # how many keys an error lists before "... and N more"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the PEFT LoraConfig per component
# network name -> its component prefix in diffusers' files and metadata
PEFT_COMPONENTS = {TRANSFORMER.name: "transformer", CLIP.name: "text_encoder"}


@dataclass
class LoRAModule:
    """One layer's LoRA as stored: down (r, in), up (out, r), alpha (None: not given)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoRA:
    """A LoRA file read into memory: its modules by alias, and its safetensors metadata."""

    path: Path
    modules: dict[str, LoRAModule]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Update:
    """One LoRA module matched to the part of a layer it updates."""

    target: lora_keys.Target
    module: LoRAModule
    alias: str
    alpha: float  # alpha to use (rank when the file gives none)
    scale_rank: float  # the r of alpha / r (sqrt(r) for rsLoRA)


def _fail(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{path} cannot be used as a {LORA_TITLE}: {reason}")


# --- reading ---------------------------------------------------------------------------------------


def read_lora(path: str | Path) -> LoRA:
    """Read a LoRA file (safetensors) into its modules; ModelLoadError naming the file when it is
    not a usable LoRA (another format, a full model, an adapter kind we do not run, a half module)."""
    path = Path(path)
    header = read_header(path, expected=LORA_TITLE)
    kinds: dict[str, str] = {}
    unknown, refused = [], {}
    for key in header.tensors:
        split = lora_keys.split_key(key)
        what = lora_keys.unsupported_kind(key)
        if what is not None:
            refused.setdefault(what, []).append(key)
        elif split is None:
            unknown.append(key)
        else:
            kinds[key] = split
    if refused:
        what, keys = next(iter(refused.items()))
        raise _fail(
            path,
            f"it is {what}, which this node does not apply ({len(keys)} such tensors, e.g. {keys[0]}); "
            "use a plain LoRA (lora_down/lora_up or lora_A/lora_B)",
        )
    if not kinds:
        raise _fail(path, f"it is not a LoRA: {_what_file(path)}")
    if unknown:
        raise _fail(
            path,
            f"{len(unknown)} of its {len(header.tensors)} keys are not LoRA tensors "
            f"(lora_down/lora_up, lora_A/lora_B, alpha): {list_keys(unknown, SHOWN)}",
        )
    tensors = _read_all(path, header)
    modules: dict[str, LoRAModule] = {}
    for key, (alias, kind) in kinds.items():
        module = modules.setdefault(alias, LoRAModule())
        module.keys.append(key)
        tensor = tensors[key]
        if kind == "alpha":
            if tensor.numel() != 1:
                shape = tuple(tensor.shape)
                raise _fail(path, f"{key} should be one number (the LoRA alpha), has shape {shape}")
            module.alpha = float(tensor.float().item())
        else:
            setattr(module, kind, tensor)
    problems = []
    for alias, module in modules.items():
        if module.down is None or module.up is None:
            missing = "down (lora_down / lora_A)" if module.down is None else "up (lora_up / lora_B)"
            problems.append(f"{alias} has no {missing} matrix")
        elif module.down.ndim != 2 or module.up.ndim != 2 or module.up.shape[1] != module.down.shape[0]:
            problems.append(
                f"{alias}: up {tuple(module.up.shape)} and down {tuple(module.down.shape)} are not the "
                "(out, r) and (r, in) matrices of a LoRA of a linear layer"
            )
    if problems:
        raise _fail(path, f"{len(problems)} of its modules are incomplete: {'; '.join(problems[:SHOWN])}")
    return LoRA(path=path, modules=modules, metadata=dict(header.metadata))


def _what_file(path: Path) -> str:
    info = inspect_file(path, expected=LORA_TITLE)
    return info.describe()


def _read_all(path: Path, header: Header) -> dict[str, torch.Tensor]:
    """Every tensor of the file, read into fresh CPU memory in its stored dtype."""
    out = {}
    try:
        with path.open("rb") as raw:
            for key, entry in header.tensors.items():
                out[key] = _read_entry(raw, entry)
    except OSError as e:
        raise _fail(path, f"reading its tensors failed ({e}); the file may be damaged") from e
    return out


def _read_entry(raw, entry: TensorEntry) -> torch.Tensor:
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    raw.seek(entry.start)
    if raw.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise OSError(f"the file ended inside a tensor (bytes {entry.start}..{entry.end})")
    return buffer.view(SAFETENSORS_DTYPES[entry.dtype]).view(entry.shape)


# --- matching --------------------------------------------------------------------------------------


def linear_layers(networks: Mapping[str, nn.Module]) -> dict[str, dict[str, Linear]]:
    """network -> {name: layer} of every `flux.ops.Linear` a LoRA may update."""
    return {
        network: {name: m for name, m in module.named_modules() if isinstance(m, Linear)}
        for network, module in networks.items()
    }


def plan_lora(lora: LoRA, networks: Mapping[str, nn.Module]) -> list[Update]:
    """Every module of `lora` matched to its layer (shapes checked); ModelLoadError otherwise.

    `networks`: network name ("transformer", "clip", "t5") -> the loaded module (any subset).
    """
    layers = linear_layers(networks)
    shapes = {net: {n: (m.out_features, m.in_features) for n, m in ls.items()} for net, ls in layers.items()}
    aliases = lora_keys.alias_map(shapes)
    matched = {alias: aliases[alias] for alias in lora.modules if alias in aliases}
    unmatched = [a for a in lora.modules if a not in matched]
    if not matched or (unmatched and all(t.network != TRANSFORMER.name for t in matched.values())):
        looks = lora_keys.describe_foreign(unmatched, lora.metadata)
        raise _fail(
            lora.path,
            f"{len(unmatched)} of its {len(lora.modules)} layers are no layer of FLUX.1's transformer, "
            f"CLIP-L or T5 (first: {list_keys(unmatched, SHOWN)}); it looks like {looks}",
        )
    if unmatched:
        raise _fail(
            lora.path,
            f"{len(unmatched)} of its {len(lora.modules)} layers match no layer of the loaded "
            f"FLUX.1 [schnell] networks ({_loaded(networks)}), so it would apply only in part: "
            f"{list_keys(unmatched, SHOWN)}" + _hint(unmatched),
        )
    peft = _peft_alphas(lora)
    updates, wrong = [], []
    for alias, target in matched.items():
        module = lora.modules[alias]
        layer = layers[target.network][target.module]
        rows = target.rows or (0, layer.out_features)
        want_up, want_down = rows[1] - rows[0], layer.in_features
        if module.up.shape[0] != want_up or module.down.shape[1] != want_down:
            wrong.append(
                f"{alias}: up {tuple(module.up.shape)}, down {tuple(module.down.shape)} but the "
                f"{lora_keys.NETWORKS[target.network].title}'s {target.module} needs up ({want_up}, r), "
                f"down (r, {want_down})"
            )
            continue
        alpha, scale_rank = _alpha(module, alias, target, peft)
        updates.append(Update(target, module, alias, alpha, scale_rank))
    if wrong:
        raise _fail(
            lora.path,
            f"{len(wrong)} of its {len(lora.modules)} layers do not fit the shapes of the loaded networks "
            f"(a LoRA for another FLUX model?): {'; '.join(wrong[:SHOWN])}"
            + (f"; ... and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""),
        )
    return updates


def _loaded(networks: Mapping[str, nn.Module]) -> str:
    return ", ".join(lora_keys.NETWORKS[n].title for n in networks)


def _hint(unmatched: Sequence[str]) -> str:
    if any("guidance_in" in a or "guidance_embedder" in a for a in unmatched):
        return "; guidance_in layers exist only in FLUX.1 [dev]"
    return ""


def _peft_alphas(lora: LoRA) -> dict[str, dict]:
    """diffusers' saved PEFT LoraConfig per component ("transformer", "text_encoder"), if any."""
    raw = lora.metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _fail(lora.path, f"its {PEFT_METADATA_KEY} metadata is not JSON ({e})") from e
    out: dict[str, dict] = {}
    for key, value in config.items() if isinstance(config, dict) else ():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    for component, values in out.items():
        if values.get("use_dora"):
            raise _fail(
                lora.path, f"its metadata says the {component} LoRA is DoRA, which this node does not apply"
            )
    return out


def _alpha(module: LoRAModule, alias: str, target: lora_keys.Target, peft: dict) -> tuple[float, float]:
    """(alpha, r) of the scale alpha / r: the file's `.alpha`, else PEFT metadata, else the rank."""
    rank = module.rank
    if module.alpha is not None:
        return module.alpha, rank
    component = PEFT_COMPONENTS.get(target.network)
    config = peft.get(component) if component else None
    if not config or not alias.startswith(f"{component}."):
        return float(rank), rank
    name = alias[len(component) + 1 :]
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):  # PEFT's get_pattern_key rule
            alpha = value
            break
    return float(alpha), (math.sqrt(rank) if config.get("use_rslora") else rank)


# --- applying --------------------------------------------------------------------------------------


def apply_loras(
    networks: Mapping[str, nn.Module],
    loras: Sequence[tuple[LoRA, float]],
    dtype: torch.dtype = torch.float32,
) -> int:
    """Replace the networks' LoRAs by `loras` ((LoRA, strength) pairs, stacked); returns how many
    layers got an update. Every LoRA is matched before anything changes, so a LoRA that does not fit
    leaves the networks as they were. The updates are kept in `dtype` (the compute dtype) on the
    device of each layer's weight."""
    plans = [(plan_lora(lora, networks), strength) for lora, strength in loras]
    layers = linear_layers(networks)
    pieces: dict[tuple[str, str], list[LowRankPiece]] = {}
    for updates, strength in plans:
        if strength == 0:  # checked above, adds nothing
            continue
        for u in updates:
            layer = layers[u.target.network][u.target.module]
            start, stop = u.target.rows or (0, layer.out_features)
            up = u.module.up.float() * (strength * u.alpha / u.scale_rank)  # (stop - start, r)
            if u.target.swap_halves:  # diffusers (scale, shift) rows -> BFL (shift, scale)
                half = up.shape[0] // 2
                up = torch.cat((up[half:], up[:half]))
            piece = LowRankPiece(start, stop, u.module.down.float(), up)
            pieces.setdefault((u.target.network, u.target.module), []).append(piece)
    remove_loras(networks)
    for (network, name), layer_pieces in pieces.items():
        layer = layers[network][name]
        adapter = LowRankAdapter(layer.out_features, layer_pieces, dtype)
        layer.lora = adapter.to(layer.weight.device)
    return len(pieces)


def remove_loras(networks: Mapping[str, nn.Module] | Sequence[nn.Module]) -> None:
    """Detach every LoRA from the networks' layers."""
    modules = networks.values() if isinstance(networks, Mapping) else networks
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, Linear) and layer.lora is not None:
                layer.lora = None


def adapters(module: nn.Module) -> Iterator[LowRankAdapter]:
    """The LoRA adapters attached to a network's layers."""
    for layer in module.modules():
        if isinstance(layer, Linear) and layer.lora is not None:
            yield layer.lora


def move_loras(module: nn.Module, device: torch.device | str) -> None:
    """Place a network's LoRA adapters on `device` (after its weights moved there)."""
    for adapter in adapters(module):
        adapter.to(device)
