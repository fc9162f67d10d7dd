"""Weight files to ready networks: config inference from tensor shapes, then build-on-meta and assign.

Each network of FLUX.1 [schnell] (transformer, autoencoder, T5-XXL, CLIP-L) is loaded the same way:

1. `checkpoint.inspect_file` reads the header only and finds the network's keys (any layout: its own
   single file or a ComfyUI all-in-one checkpoint);
2. its hyper-parameters are inferred from the tensor shapes (the way ComfyUI's model detection does;
   read for facts only), so a file of any width or depth in the right layout loads;
3. the network is built on the meta device (no memory), every expected key is looked up in the file
   and its shape checked, and one error lists every missing key, unexpected key and wrong shape;
4. the tensors are assigned into the network (`load_state_dict(assign=True)`):
   - on the CPU, in the stored dtype: the parameters ARE the memory-mapped file, no copy at all (a
     read-only mapping of only the byte range of that network, so the other networks of an
     all-in-one checkpoint are not mapped; being read-only it takes page cache only and does not
     count towards the kernel's commit limit, so a file larger than RAM + swap still loads. Nothing
     writes to these parameters: assigning them and every forward only read them);
   - otherwise (another device or dtype): each tensor is read from the file on its own, then moved
     and cast, so at most one tensor is held twice at any time.

Weight dtype (`weight_dtype`):
- None: as stored (fp32, fp16, bf16 or float8_e4m3fn);
- torch.float32 / torch.float16 / torch.bfloat16: every tensor is cast to it;
- torch.float8_e4m3fn: the weights of `flux.ops` Linear and Conv2d layers and the vocabulary tables
  (`flux.ops.TokenEmbedding`: T5's `shared`, CLIP's token embedding) become fp8, clamped to ±448
  first: >99% of the bytes. Biases, norm scales, T5's relative position bias, CLIP's position
  embedding and other small tensors keep their stored dtype, so their precision is not lost for no
  saving (T5's bias table feeds every attention logit).
A file stored in fp8 stays fp8 in memory unless a wider `weight_dtype` is asked for.

Stored forms that stay as they are whatever `weight_dtype` says (`flux.stored_layers`):
- GGUF weights in a GGML block type (Q8_0 ... Q6_K) stay bytes, dequantized per layer at run time
  (`ops.compute_weight`): memory is the file's size. Their F32/F16/BF16 tensors follow the rules
  above;
- ComfyUI's scaled fp8 layers keep their fp8 weight and a one-number fp32 scale per layer, applied
  at run time; asked for a wider `weight_dtype`, the scale is folded in at load instead.

The per-network parts below are only a config-inference function and a `_Network` entry (keys the
file may carry that the network does not have, and the one tied alias of T5).

`check_files_compatible(transformer, t5, clip, ae)` runs steps 1-2 only (headers, no tensor data)
for the four files and raises one ModelLoadError when the networks would not fit together.
"""

from __future__ import annotations

import errno
import mmap
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidInputError, ModelLoadError, OutOfMemoryError
from . import ops, stored_layers
from .autoencoder import AutoEncoder, AutoEncoderParams
from .checkpoint import (
    STORED_DTYPES,
    CheckpointInfo,
    ComponentInfo,
    Header,
    TensorEntry,
    describe_other,
    inspect_file,
    list_keys,
)
from .clip import CLIPTextConfig, CLIPTextEncoder
from .components import AE, CLIP, T5, TRANSFORMER, Component
from .fp8_matmul import FP8_MAX
from .model import Flux, FluxParams
from .scaled_fp8 import LayerScales, find_layer_scales
from .t5 import T5Config, T5Encoder

LOAD_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
# layers whose weight fp8 loading narrows: the matrices, the kernels and the vocabulary tables
CASTING_LAYERS = (ops.Linear, ops.Conv2d, ops.TokenEmbedding)

FLUX_HEAD_DIM = 128  # every FLUX.1 transformer: hidden = 128 * heads, RoPE over axes 16+56+56
FLUX_AXES_DIM = (16, 56, 56)
FLUX_THETA = 10_000
FLUX_LATENT_CHANNELS = 16
CLIP_HEAD_DIM = 64  # CLIP text encoders (L, G) use 64-wide heads


# --- config inference from shapes ---------------------------------------------------------------


class _Shapes:
    """Tensor shapes by key (prefix removed), with an error naming the key when one is missing."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], what: str):
        self._shapes = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __getitem__(self, key: str) -> tuple[int, ...]:
        try:
            return self._shapes[key]
        except KeyError as e:
            raise ValueError(f"the key {key!r} that every {self.what} has is missing") from e

    def count(self, prefix: str) -> int:
        """How many numbered blocks `prefix{N}.` there are: 1 + the highest N, 0 when none."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = [int(m.group(1)) for k in self._shapes if (m := pattern.match(k))]
        return max(found) + 1 if found else 0


def infer_flux_params(shapes: Mapping[str, Sequence[int]]) -> FluxParams:
    """FLUX transformer hyper-parameters from its tensor shapes (BFL key names, no prefix)."""
    s = _Shapes(shapes, "FLUX transformer")
    hidden, in_channels = s["img_in.weight"]
    if hidden % FLUX_HEAD_DIM:
        raise ValueError(
            f"img_in.weight has {hidden} rows; a FLUX transformer's width is a multiple of its "
            f"head dim {FLUX_HEAD_DIM}"
        )
    depth = s.count("double_blocks.")
    single = s.count("single_blocks.")
    if depth:
        mlp_hidden = s["double_blocks.0.img_mlp.0.weight"][0]
    elif single:
        mlp_hidden = s["single_blocks.0.linear1.weight"][0] - 3 * hidden  # [qkv | mlp] rows
    else:
        raise ValueError("the file has neither double_blocks.* nor single_blocks.* keys")
    return FluxParams(
        in_channels=in_channels,
        out_channels=s["final_layer.linear.weight"][0],
        vec_in_dim=s["vector_in.in_layer.weight"][1],
        context_in_dim=s["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // FLUX_HEAD_DIM,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=FLUX_AXES_DIM,
        theta=FLUX_THETA,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in s or depth == 0,
        guidance_embed="guidance_in.in_layer.weight" in s,
    )


def infer_autoencoder_params(shapes: Mapping[str, Sequence[int]]) -> AutoEncoderParams:
    """Autoencoder hyper-parameters from its tensor shapes (ae.safetensors key names, no prefix).

    `scale_factor`, `shift_factor` and `resolution` are not in the file: they are FLUX.1's.
    """
    s = _Shapes(shapes, "FLUX autoencoder")
    ch, in_channels = s["encoder.conv_in.weight"][:2]
    levels = s.count("encoder.down.")
    widths = [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of conv_in's {ch} channels")
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=s["decoder.conv_out.weight"][0],
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=s.count("encoder.down.0.block."),
        z_channels=s["decoder.conv_in.weight"][1],
    )


def infer_t5_config(shapes: Mapping[str, Sequence[int]]) -> T5Config:
    """T5 v1.1 encoder hyper-parameters from its tensor shapes (Hugging Face key names)."""
    s = _Shapes(shapes, "T5 v1.1 encoder")
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in s:
        raise ValueError(
            "its feed-forward is not gated (DenseReluDense.wi): this is a T5 v1.0 model, FLUX uses "
            "T5 v1.1 XXL"
        )
    embedding = "shared.weight" if "shared.weight" in s else "encoder.embed_tokens.weight"
    vocab_size, d_model = s[embedding]
    buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = s["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    if inner % heads:
        raise ValueError(f"q.weight has {inner} rows, not a multiple of the {heads} heads")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=s.count("encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def infer_clip_config(shapes: Mapping[str, Sequence[int]]) -> CLIPTextConfig:
    """CLIP text encoder hyper-parameters from its tensor shapes (`text_model.*` key names)."""
    s = _Shapes(shapes, "CLIP text encoder")
    vocab_size, hidden = s["text_model.embeddings.token_embedding.weight"]
    if hidden % CLIP_HEAD_DIM:
        raise ValueError(f"its width {hidden} is not a multiple of CLIP's head dim {CLIP_HEAD_DIM}")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_layers=s.count("text_model.encoder.layers."),
        num_heads=hidden // CLIP_HEAD_DIM,
        max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
    )


# --- what each network adds to the generic loader -----------------------------------------------


def _refuse_dev(params: FluxParams) -> str | None:
    if params.guidance_embed:
        return (
            "it is a FLUX.1 [dev] transformer (it has guidance_in.* keys); this node runs FLUX.1 "
            f"[schnell]: give {TRANSFORMER.file_hint}"
        )
    return None


def _refuse_foreign_vae(params: AutoEncoderParams) -> str | None:
    if params.z_channels != FLUX_LATENT_CHANNELS or params.downscale_factor != 8:
        return (
            f"it is an autoencoder with {params.z_channels} latent channels at 1/{params.downscale_factor} "
            f"size (a Stable Diffusion VAE?); FLUX.1 needs its own {FLUX_LATENT_CHANNELS}-channel "
            f"VAE: give {AE.file_hint}"
        )
    return None


@dataclass(frozen=True)
class _Network:
    """How to load one network: find it, infer its config, build it, match its keys."""

    component: Component
    infer: Callable[[Mapping[str, Sequence[int]]], object]
    build: Callable[[object], nn.Module]
    ignored: tuple[str, ...] = ()  # keys files may carry that the network does not use
    aliases: dict[str, str] = field(default_factory=dict)  # network key -> other file key for it
    refuse: Callable[[object], str | None] = lambda config: None  # why this config is not usable


_TRANSFORMER = _Network(TRANSFORMER, infer_flux_params, Flux, refuse=_refuse_dev)
_AE = _Network(AE, infer_autoencoder_params, AutoEncoder, refuse=_refuse_foreign_vae)
# T5: `encoder.embed_tokens.weight` is the tied copy of `shared.weight`; used only if that is absent
_T5 = _Network(T5, infer_t5_config, T5Encoder, aliases={"shared.weight": "encoder.embed_tokens.weight"})
_CLIP = _Network(
    CLIP,
    infer_clip_config,
    CLIPTextEncoder,
    ignored=("text_projection.weight", "text_model.embeddings.position_ids", "logit_scale"),
)


# --- the generic loader -------------------------------------------------------------------------


def load_transformer(
    path: str | Path, *, device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None
) -> Flux:
    """The FLUX.1 [schnell] transformer from flux1-schnell.safetensors or an all-in-one checkpoint."""
    return _load(path, _TRANSFORMER, device, weight_dtype)


def load_autoencoder(
    path: str | Path, *, device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None
) -> AutoEncoder:
    """The FLUX.1 autoencoder from ae.safetensors or an all-in-one checkpoint."""
    return _load(path, _AE, device, weight_dtype)


def load_t5(
    path: str | Path, *, device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None
) -> T5Encoder:
    """The T5-XXL encoder from t5xxl_*.safetensors or an all-in-one checkpoint."""
    return _load(path, _T5, device, weight_dtype)


def load_clip(
    path: str | Path, *, device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None
) -> CLIPTextEncoder:
    """The CLIP-L text encoder from clip_l.safetensors or an all-in-one checkpoint."""
    return _load(path, _CLIP, device, weight_dtype)


def _load(path, net: _Network, device, weight_dtype) -> nn.Module:
    if weight_dtype not in LOAD_DTYPES:
        raise InvalidInputError(
            f"weight_dtype must be one of {', '.join(map(str, LOAD_DTYPES))}, got {weight_dtype!r}"
        )
    device = torch.device(device)
    found = _inspect(path, net)
    comp, entries, config, fail = found.comp, found.entries, found.config, found.fail

    with torch.device("meta"):
        model = net.build(config)
    model.requires_grad_(False).eval()
    chosen = _match_keys(fail, comp, entries, model, net, config)
    narrow = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, CASTING_LAYERS)}
    wanted = {key: entries[fk] for key, fk in chosen.items()}
    plan = stored_layers.prepare(  # GGUF block weights stay bytes; fp8 scales become buffers
        model,
        wanted,
        {key: _target_dtype(e.torch_dtype, weight_dtype, key in narrow) for key, e in wanted.items()},
        {layer: found.quant_entries[key] for layer, key in found.scales.scales.items()},
        weight_dtype,
        fail,
    )
    state = _read_tensors(found.info.header, plan.entries, plan.dtypes, device, fail)
    model.load_state_dict(plan.finish(state), strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer the network computes at construction would be lost on meta
        raise RuntimeError(f"{type(model).__name__} has tensors no file provides: {left}")
    return model


@dataclass(frozen=True)
class _Found:
    """What the header of a file says about one network in it (no tensor data read)."""

    info: CheckpointInfo
    comp: ComponentInfo
    entries: dict[str, TensorEntry]  # key without the prefix -> where its data lies
    config: object
    fail: Callable[[str], ModelLoadError]
    scales: LayerScales  # ComfyUI fp8 layers: layer -> the key of its scale
    quant_entries: dict[str, TensorEntry]  # the scales and other keys describing the quantization


def _inspect(path, net: _Network) -> _Found:
    """Find `net` in the header of `path` and infer its config; ModelLoadError when it is not usable."""
    spec = net.component
    info = inspect_file(path, expected=spec.title)

    def fail(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{info.path} cannot be loaded as the {spec.title}: {reason}")

    if info.unsupported:
        raise fail(f"it is {info.unsupported}")
    comp = info.components.get(spec.name)
    if comp is None:
        raise fail(f"{describe_other(info)}. Give {spec.file_hint}")

    entries = {k[len(comp.prefix) :]: info.header.tensors[k] for k in comp.keys}  # prefix removed
    scales = find_layer_scales(
        {k: e.shape for k, e in entries.items()},
        info.header.metadata,
        comp.prefix,
        lambda key: _read_bytes(info.header, entries[key]),
        fail,
    )
    quant_keys = set(scales.metadata_keys) | set(scales.scales.values())  # not weights of the network
    weights = {k: e for k, e in entries.items() if k not in quant_keys}
    try:
        config = net.infer({k: e.shape for k, e in weights.items()})
    except ValueError as e:  # a missing key or an impossible shape; config classes raise ValueError
        raise fail(f"{_where(comp)}: {e}") from e
    refusal = net.refuse(config)
    if refusal:
        raise fail(refusal)
    return _Found(info, comp, weights, config, fail, scales, {k: entries[k] for k in quant_keys})


def _where(comp: ComponentInfo) -> str:
    return f"the {comp.spec.title} keys under prefix {comp.prefix!r}" if comp.prefix else "the file"


def _match_keys(fail, comp, entries: dict[str, TensorEntry], model, net: _Network, config):
    """Network key -> file key (prefix removed) for every tensor; one error listing every problem."""
    chosen, missing, wrong_shape, wrong_dtype = {}, [], [], []
    for key, t in model.state_dict().items():
        file_key = key if key in entries else net.aliases.get(key)
        if file_key not in entries:
            missing.append(comp.prefix + key)
            continue
        chosen[key] = file_key
        found = entries[file_key]
        if found.shape != tuple(t.shape):
            wrong_shape.append(f"{comp.prefix}{file_key}: expected {tuple(t.shape)}, found {found.shape}")
        if found.dtype not in STORED_DTYPES:
            wrong_dtype.append(f"{comp.prefix}{file_key} ({found.dtype})")
    known = set(chosen.values()) | set(net.ignored) | set(net.aliases.values())
    unexpected = [comp.prefix + k for k in entries if k not in known]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {list_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape[:12])}")
    if wrong_dtype:
        problems.append(
            f"unsupported dtypes (use fp32, fp16, bf16 or float8_e4m3fn): {list_keys(wrong_dtype)}"
        )
    if problems:
        raise fail(
            f"its tensors do not fit the {comp.spec.title} their shapes describe ({config}); "
            + "; ".join(problems)
        )
    return chosen


def _target_dtype(stored: torch.dtype, weight_dtype: torch.dtype | None, narrowable: bool):
    """The dtype a tensor is kept in, given the stored one and the requested `weight_dtype`."""
    if weight_dtype is None or (weight_dtype.itemsize == 1 and not narrowable):
        return stored
    return weight_dtype


def _read_tensors(header: Header, entries: dict[str, TensorEntry], dtypes: dict, device, fail) -> dict:
    """key -> tensor on `device` in `dtypes[key]`; memory-mapped when nothing needs to change."""
    in_place = [
        key
        for key, entry in entries.items()
        if device.type == "cpu" and dtypes[key] == entry.torch_dtype and entry.numel
    ]
    state = {}
    try:
        with header.path.open("rb") as raw:
            if in_place:
                state.update(_map(raw, {key: entries[key] for key in in_place}))
            for key, entry in entries.items():
                if key not in state:
                    state[key] = _convert(_read_one(raw, entry), dtypes[key], device)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise OutOfMemoryError(
                f"{header.path} could not be memory-mapped ({e}): this process may map no more "
                "address space (a `ulimit -v` limit, or vm.max_map_count reached); raise that "
                "limit, or load it to the GPU, or as fp8 (weight_dtype=torch.float8_e4m3fn: its "
                "large weights are then read, not mapped)"
            ) from e
        raise fail(f"reading its tensors failed ({e}); the file may be damaged") from e
    return state


def _map(raw, entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Views of the tensors in one read-only mapping of the file range that holds them.

    Only that range is mapped (one network of an all-in-one checkpoint, not the whole file). Pages
    are read from disk when first touched and can be dropped again under memory pressure, so the
    mapping needs no commit charge (a copy-on-write one would: 24 GB of it fails on a machine with
    less RAM + swap). The tensors keep the mapping alive. Writing to one would crash the process
    (SIGSEGV): nothing does, since `load_state_dict(assign=True)` only wraps them as parameters, the
    networks never change a parameter in place, and every cast or move makes a new tensor.
    """
    first = min(e.start for e in entries.values())
    base = first - first % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
    length = max(e.end for e in entries.values()) - base
    window = mmap.mmap(raw.fileno(), length, access=mmap.ACCESS_READ, offset=base)
    with warnings.catch_warnings():  # torch warns that it cannot mark tensors read-only: known
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return {
            key: torch.frombuffer(window, dtype=torch.uint8, count=e.end - e.start, offset=e.start - base)
            .view(e.torch_dtype)
            .view(e.stored_shape)
            for key, e in entries.items()
        }


def _read_one(raw, entry: TensorEntry) -> torch.Tensor:
    """One tensor read from the open file into fresh CPU memory (so the page cache is not held)."""
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    raw.seek(entry.start)
    if raw.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise OSError(f"the file ended inside a tensor (bytes {entry.start}..{entry.end})")
    return buffer.view(entry.torch_dtype).view(entry.stored_shape)


def _read_bytes(header: Header, entry: TensorEntry) -> bytes:
    """The raw bytes of one (small) tensor, e.g. the JSON of a `.comfy_quant` entry."""
    with header.path.open("rb") as raw:
        raw.seek(entry.start)
        return raw.read(entry.end - entry.start)


def _convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A freshly read `t` moved to `device` (as stored: fewer bytes to move when widening), cast."""
    t = t.to(device)
    if t.dtype == dtype:
        return t
    if dtype.itemsize == 1 and t.dtype.itemsize == 1:  # float8_e5m2 (up to 57344) to e4m3fn
        t = t.float()
    if dtype.itemsize == 1:
        t.clamp_(-FP8_MAX, FP8_MAX)  # fp8 e4m3fn has no infinity: larger values would become NaN
    return t.to(dtype)


def check_compatible(
    transformer: FluxParams,
    *,
    t5: T5Config | None = None,
    clip: CLIPTextConfig | None = None,
    autoencoder: AutoEncoderParams | None = None,
) -> None:
    """Raise ModelLoadError when the loaded networks cannot work together (e.g. CLIP-G for CLIP-L)."""
    problems = _mismatches(transformer, t5, clip, autoencoder, {})
    if problems:
        raise ModelLoadError("the model files do not belong together: " + "; ".join(problems))


def check_files_compatible(transformer: str | Path, t5: str | Path, clip: str | Path, ae: str | Path) -> None:
    """Raise ModelLoadError, before any loading, when the four files cannot work together.

    Reads the file headers only (no tensor data): each network is found as the loaders find it (its
    own file, or its prefix in an all-in-one checkpoint) and its config inferred from the shapes.
    A file that holds no usable network of its kind raises the loader's own error; networks that
    do not fit together (a CLIP-G given for the CLIP-L, a T5 of another width, a VAE with another
    latent) raise one error naming the files and every mismatch.
    """
    found = {
        name: _inspect(path, net)
        for name, path, net in (
            ("transformer", transformer, _TRANSFORMER),
            ("t5", t5, _T5),
            ("clip", clip, _CLIP),
            ("ae", ae, _AE),
        )
    }
    files = {name: f" ({f.info.path})" for name, f in found.items()}
    problems = _mismatches(
        found["transformer"].config,
        found["t5"].config,
        found["clip"].config,
        found["ae"].config,
        files,
    )
    if problems:
        raise ModelLoadError("the model files do not belong together: " + "; ".join(problems))


def _mismatches(
    transformer: FluxParams,
    t5: T5Config | None,
    clip: CLIPTextConfig | None,
    autoencoder: AutoEncoderParams | None,
    files: Mapping[str, str],
) -> list[str]:
    """Every way the networks do not fit the transformer; `files[name]` follows each one's name."""
    flux = f"the transformer{files.get('transformer', '')}"
    problems = []
    if t5 is not None and t5.d_model != transformer.context_in_dim:
        problems.append(
            f"the T5 text encoder{files.get('t5', '')} is {t5.d_model} wide but {flux} takes "
            f"{transformer.context_in_dim}-wide text (T5-XXL: 4096): give {T5.file_hint}"
        )
    if clip is not None and clip.hidden_size != transformer.vec_in_dim:
        problems.append(
            f"the CLIP text encoder{files.get('clip', '')} is {clip.hidden_size} wide but {flux} "
            f"takes a {transformer.vec_in_dim}-wide pooled vector (CLIP-L: 768; 1280 is SDXL's "
            f"CLIP-G): give {CLIP.file_hint}"
        )
    if autoencoder is not None and 4 * autoencoder.z_channels != transformer.in_channels:
        problems.append(
            f"the autoencoder{files.get('ae', '')} has {autoencoder.z_channels} latent "
            f"channels, {4 * autoencoder.z_channels} features once packed 2x2, but {flux} takes "
            f"{transformer.in_channels}: give {AE.file_hint}"
        )
    return problems
