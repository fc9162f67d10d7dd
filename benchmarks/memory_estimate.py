"""Peak GPU memory of the local pipeline at full size, measured without a GPU (meta tensors).

What it measures: the bytes `torch.cuda.max_memory_allocated` would report for one FLUX.1 [schnell]
run (default 1024x1024, batch 1, 4 steps, compute bf16), stage by stage, for weight_dtype
fp8_e4m3fn and bf16 and for GGUF transformer and T5 files (Q8_0 and Q4_K_S), and the targets of the
issues: 16 GB with fp8 weights, 26 GB with bf16, 8 GiB with a Q4_K-class GGUF transformer and T5.

How: the four real networks are built at full size on the meta device (shapes and dtypes, no data)
with their parameters in the dtypes `flux/loading.py` gives them (its own `_target_dtype` rule:
with fp8, the weights of `ops.Linear/Conv2d/Embedding` become float8_e4m3fn and biases and norm
scales keep the file's dtype; the transformer file is bf16, T5 fp16, CLIP-L fp16 and the
autoencoder fp32, CLIP and AE being loaded as stored). The GGUF forms ("gguf-Q8_0",
"gguf-Q4_K_S") keep the transformer's and T5's matrices as the bytes of their blocks, as
`flux.stored_layers` loads them, with city96's and llama.cpp's choices of what stays unquantized
(`gguf_form`); every layer then dequantizes its weight when it runs, and those transients are
counted like any other tensor. Then the real `local_pipeline.run_pipeline` runs on
them with device "meta": text encoding, sampling one image at a time, decoding. A
`TorchDispatchMode` (`LiveTensorTracker`) sees every tensor each aten op creates, counts each new
storage once (views and in-place results share their input's storage), subtracts it when the
storage dies (a weakref on the storage) and records the peak of the live bytes; composite ops,
which inference mode hands to the mode whole, are run through ATen's own C++ decomposition so that
their temporaries count too. A stand-in for `MemoryPolicy` marks the stage boundaries, and the
"auto" choice is then simulated on the measured numbers (`simulate_auto`). The arithmetic of
sizes is exact; what is modelled:

- Kernels that a CUDA build runs differently from the meta device's decompositions. By default
  (`--native-kernels` turns this off) `F.scaled_dot_product_attention` is replaced by the fused
  kernel a GPU would pick: flash attention (no mask, fp16/bf16, head dim <= 256: the transformer and
  CLIP) or memory-efficient attention (T5 with its additive position bias, the autoencoder's
  512-wide head), each run through its own aten op's meta kernel, so what is charged is the output
  and the logsumexp, never the L x L scores of the math path (cuDNN attention, which newer torch
  prefers on some GPUs, also holds O(L)); memory-efficient attention with a head wider than 128
  also gets its fp32 output accumulator, and a bias whose layout it cannot use gets the
  contiguous copy `pad_bias` makes. `F.rms_norm` is replaced by the fused kernel of a CUDA
  build (`_fused_rms_norm`: a contiguous copy of a non-contiguous input, the output, fp32 rstd)
  instead of the fp32 composite the meta device decomposes it into.
- The caching allocator's rounding: a second count rounds every allocation the way a fresh one is
  counted (512-byte blocks; allocations of 10 MiB and more get a 2 MiB-rounded segment, counted
  whole when less than 1 MiB would be left). Weights count as one allocation per tensor, as
  `Placed.to` moves them.

What it cannot see (none of it changes the order of magnitude): cuBLAS/cuBLASLt workspaces (a few
MiB to 32 MiB, allocated once through the caching allocator, so `max_memory_allocated` does count
them), cuDNN convolution workspaces in the autoencoder (chosen per call by cuDNN's heuristics, also
counted; can reach hundreds of MiB for the 1024x1024 convolutions), fragmentation (reserved but not
allocated: not counted by `max_memory_allocated`) and the CUDA context (~0.5 GiB, never counted by
`max_memory_allocated` but taken from the card).

Usage:
    python -m benchmarks.memory_estimate                          # fp8, bf16, GGUF Q8_0, Q4_K_S
    python -m benchmarks.memory_estimate --weight-dtype gguf-Q4_K_S --cards 8
    python -m benchmarks.memory_estimate --weight-dtype bf16 --height 768 --width 1360 --top 12
    python -m benchmarks.memory_estimate --native-kernels          # meta's own SDPA / RMS norm
    python -m benchmarks.memory_estimate --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.flux import loading, stored_layers
from comfyui_flux_schnell.flux.autoencoder import AutoEncoder, AutoEncoderParams
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from comfyui_flux_schnell.flux.gguf_quants import GGML_TYPES
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local import memory as local_memory
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local import pipeline as local_pipeline
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB, GIB = 2**20, 2**30
# bytes of max_memory_allocated
TARGETS = {"fp8_e4m3fn": 16 * 10**9, "bf16": 26 * 10**9, "gguf-Q4_K_S": 8 * GIB}
# GGUF forms: the block type of the transformer's and T5's matrices ("Q4_K_S": llama-quantize's
# Q4_K_S, whose matrices are Q4_K apart from a few Q5_K ones in T5)
GGUF_FORMS = {"gguf-Q8_0": "Q8_0", "gguf-Q4_K_S": "Q4_K"}
WEIGHT_FORMS = (*local_models.LOAD_DTYPE_OF_OPTION, *GGUF_FORMS)
CUDA_CONTEXT = GIB // 2  # taken from the card, never counted by max_memory_allocated
# The dtypes of the official files: flux1-schnell.safetensors, t5xxl_fp16.safetensors,
# clip_l.safetensors, ae.safetensors (their layouts: tests/data/keys/*.json).
STORED = {
    "transformer": torch.bfloat16,
    "T5-XXL": torch.float16,
    "CLIP-L": torch.float16,
    "autoencoder": torch.float32,
}
STAGE_NAMES = {"T5-XXL": "text encoding", "transformer": "sampling", "autoencoder": "decoding"}
ATEN = torch.ops.aten
_CASTS = (ATEN._to_copy, ATEN.to)
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


# --- the caching allocator's rounding -----------------------------------------------------------


def allocator_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator counts as allocated for one fresh allocation of `nbytes`.

    Blocks are multiples of 512 bytes. Allocations of 10 MiB or more get their own segment rounded
    up to 2 MiB, which is split only when more than 1 MiB would be left over; otherwise the whole
    segment counts. (A block reused from the cache can differ; this is the fresh-segment case.)
    """
    if nbytes <= 0:
        return 0
    size = -(-nbytes // 512) * 512
    if size < 10 * MIB:
        return size
    segment = -(-size // (2 * MIB)) * (2 * MIB)
    return segment if segment - size <= MIB else size


# --- the tracker --------------------------------------------------------------------------------


@dataclass
class Allocation:
    """One live storage: its size, the op that made it, its first tensor's shape, the module."""

    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    module: str

    def describe(self) -> str:
        return (
            f"{self.nbytes / MIB:9.1f} MiB  {self.dtype:<14} {self.shape!s:<24} {self.op:<44} {self.module}"
        )


class LiveTensorTracker(TorchDispatchMode):
    """Live bytes of the tensors created on `device_type` while active, and their peak.

    Each new storage an op returns is counted once, with its full size, until it dies (views and
    in-place results share their input's storage, so they add nothing). Storages of registered
    weights (`add_weights`) are never counted: their bytes are the models' resident weights.
    `begin_stage()` starts a new peak from the bytes live now; `peak`, `peak_rounded` (allocator
    rounding), `peak_live` (what was live at the peak) and `largest_cast` (the largest copy of a
    weight into another dtype, e.g. fp8 -> bf16) then describe that stage. A `.cpu()` of a meta
    tensor returns an uninitialised CPU tensor, so code that ends on the CPU runs too.
    """

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.weights: dict[int, str] = {}  # storage key -> parameter name
        self.live: dict[int, tuple] = {}  # storage key -> (Allocation, rounded, weakref, serial)
        self.current = self.current_rounded = self._serial = 0
        self.names: dict[int, str] = {}  # id(module) -> qualified name
        self.stack: list[str] = []
        self.begin_stage()

    # bookkeeping

    def add_weights(self, module: nn.Module, prefix: str) -> None:
        """Register `module`'s parameters and buffers as weights, and its modules' names."""
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            self.weights[t.untyped_storage()._cdata] = f"{prefix}.{name}"
        for name, m in module.named_modules():
            self.names[id(m)] = f"{prefix}.{name}" if name else prefix

    def begin_stage(self) -> None:
        self.peak, self.peak_rounded = self.current, self.current_rounded
        self.peak_live = [entry[0] for entry in self.live.values()]
        self.largest_cast: tuple[Allocation, str] | None = None

    @contextlib.contextmanager
    def module_names(self):
        """Keep `self.stack` on the module running now (global forward hooks)."""

        def push(module, args) -> None:
            self.stack.append(self.names.get(id(module), type(module).__name__))

        def pop(module, args, out) -> None:  # returns None: the output stays as it is
            if self.stack:
                self.stack.pop()

        pre = nn.modules.module.register_module_forward_pre_hook(push)
        post = nn.modules.module.register_module_forward_hook(pop)
        try:
            yield
        finally:
            pre.remove()
            post.remove()
            self.stack.clear()

    def _free(self, key: int, serial: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[3] == serial:
            alloc, rounded, _, _ = self.live.pop(key)
            self.current -= alloc.nbytes
            self.current_rounded -= rounded

    def _track(self, t: torch.Tensor, op: str) -> Allocation | None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.weights:
            return None
        alloc = Allocation(
            nbytes=storage.nbytes(),
            op=op,
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            module=self.stack[-1] if self.stack else "",
        )
        rounded = allocator_bytes(alloc.nbytes)
        self._serial += 1
        serial = self._serial  # a key (an address) may be reused once its storage has died
        ref = weakref.ref(storage, lambda _, k=key, n=serial: self._free(k, n))
        self.live[key] = (alloc, rounded, ref, serial)
        self.current += alloc.nbytes
        self.current_rounded += rounded
        return alloc

    # dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cast = func.overloadpacket in _CASTS  # inference mode sends `aten.to` here undecomposed
        if cast and self._meta_to_cpu(args, kwargs):
            dtype = kwargs.get("dtype") or next(
                (a for a in args[1:] if isinstance(a, torch.dtype)), args[0].dtype
            )
            return torch.empty(args[0].shape, dtype=dtype, device="cpu")
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # Inference mode sends composite ops here whole. Run ATen's own C++ decomposition (the
            # one CUDA runs too, not a Python one written for compilers) through this mode, so
            # that its temporaries count.
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        out = func(*args, **kwargs)
        if all(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place results allocate nothing
        # Nor does a storage seen before (e.g. `_unsafe_view`, whose schema has no alias).
        op = f"{func.overloadpacket.__name__}.{func._overloadname}"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                alloc = self._track(t, op)
                if alloc is not None and cast:
                    self._note_cast(args[0], alloc)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_live = [entry[0] for entry in self.live.values()]
        self.peak_rounded = max(self.peak_rounded, self.current_rounded)
        return out

    def _meta_to_cpu(self, args, kwargs) -> bool:
        """Whether a cast op moves a tensor of the tracked device to the CPU."""
        devices = [kwargs.get("device"), *(a for a in args[1:] if isinstance(a, torch.device))]
        return (
            isinstance(args[0], torch.Tensor)
            and args[0].device.type == self.device_type
            and any(d is not None and torch.device(d).type == "cpu" for d in devices)
        )

    def _note_cast(self, source: torch.Tensor, alloc: Allocation) -> None:
        weight = self.weights.get(source.untyped_storage()._cdata)
        if weight is None:
            return
        if self.largest_cast is None or alloc.nbytes > self.largest_cast[0].nbytes:
            from_dtype = str(source.dtype).removeprefix("torch.")
            self.largest_cast = (alloc, f"{weight} {from_dtype} -> {alloc.dtype}")


# --- the GPU's fused kernels, on meta -----------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def fused_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """What SDPA allocates on a CUDA GPU: the output of flash or memory-efficient attention.

    Flash when there is no mask, the dtype is fp16/bf16 and the head is at most 256 wide (with a
    logsumexp of B*H*L floats); memory-efficient attention otherwise (its logsumexp is empty in
    inference; with a head wider than 128 its kernel also keeps an fp32 accumulator the size of the
    output while it runs; a bias whose last dim is not contiguous and 16-aligned is copied first,
    as `pad_bias` does). Neither holds the L x L scores.
    """
    head = query.shape[-1]
    if attn_mask is None and query.dtype in _HALF and head <= 256 and head % 8 == 0:
        return ATEN._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[
            0
        ]
    if attn_mask is not None and (attn_mask.stride(-1) != 1 or any(s % 16 for s in attn_mask.stride()[:-1])):
        attn_mask = attn_mask.contiguous()
    out = ATEN._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]
    if head > 128 and out.dtype != torch.float32:
        accumulator = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        del accumulator  # lives only while the kernel runs
    return out


def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
    """What `F.rms_norm` allocates on a CUDA build (`_fused_rms_norm`): output and fp32 rstd.

    Like the other CUDA norm kernels it reads a contiguous input, so a non-contiguous one (the
    transformer's q and k, views of the fused qkv) is copied first. The kernel applies `weight`
    itself (no extra tensor); the values are never computed here.
    """
    if not x.is_contiguous():
        x = x.contiguous()
    stats = x.shape[: x.ndim - len(normalized_shape)]
    rstd = torch.empty(stats, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    del rstd
    return out


@contextlib.contextmanager
def gpu_kernels(enabled: bool = True):
    """Swap in `fused_attention` and `fused_rms_norm` for meta tensors while active."""
    saved = F.scaled_dot_product_attention, F.rms_norm

    def sdpa(query, *args, **kwargs):
        fn = fused_attention if query.device.type == "meta" else saved[0]
        return fn(query, *args, **kwargs)

    def rms_norm(x, *args, **kwargs):
        fn = fused_rms_norm if x.device.type == "meta" else saved[1]
        return fn(x, *args, **kwargs)

    if enabled:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = saved


# --- models on meta, in the dtypes loading gives them -------------------------------------------


@dataclass
class Configs:
    """The four networks' hyper-parameters (FLUX.1 [schnell]'s by default)."""

    transformer: FluxParams = field(default_factory=FluxParams)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    ae: AutoEncoderParams = field(default_factory=AutoEncoderParams)


def on_meta(build, config, stored: torch.dtype, weight_dtype: torch.dtype | None) -> nn.Module:
    """`build(config)` on meta, each tensor in the dtype `flux.loading` would load it in."""
    with torch.device("meta"):
        model = build(config)
    model.requires_grad_(False).eval()
    narrow = {  # as in loading._load (which never meets a casting layer at the root)
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, loading.CASTING_LAYERS)
    }
    state = {
        key: torch.empty(
            t.shape,
            dtype=loading._target_dtype(stored, weight_dtype, key in narrow),
            device="meta",
        )
        for key, t in model.state_dict().items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model


# tensors city96's FLUX GGUFs keep unquantized (tools/lcpp.patch of ComfyUI-GGUF), in the bf16
# of the source file; llama.cpp keeps T5's relative position bias unquantized (F16)
FLUX_UNQUANTIZED = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def gguf_form(build, config, block_type: str, unquantized: torch.dtype, keep=()) -> nn.Module:
    """`build(config)` on meta as a GGUF file of `block_type` loads: the matrices of its
    Linear/Embedding layers as bytes (those of layers starting with one of `keep`, and rows that
    do not split into blocks, in `unquantized`), 1-D tensors F32."""
    with torch.device("meta"):
        model = build(config)
    model.requires_grad_(False).eval()
    block = GGML_TYPES[block_type]
    for name, layer in model.named_modules():
        w = getattr(layer, "weight", None)
        if not isinstance(layer, stored_layers.STORED_FORM_LAYERS) or w is None or w.dim() != 2:
            continue
        if f"{name}.".startswith(keep) or "relative_attention_bias" in name or w.shape[-1] % block.block_size:
            layer.weight = nn.Parameter(torch.empty(w.shape, dtype=unquantized, device="meta"), False)
        else:
            raw = torch.empty(block.byte_shape(tuple(w.shape)), dtype=torch.uint8, device="meta")
            stored_layers.make_gguf_layer(layer, block_type, tuple(w.shape), raw)
    return model  # the 1-D tensors stay F32 as built


def build_models(weight_dtype: str, configs: Configs) -> dict[str, nn.Module]:
    """name -> module, as `local_backend.load_models` loads them (T5 and transformer narrowed, or
    in a GGUF form)."""
    if weight_dtype in GGUF_FORMS:
        block_type = GGUF_FORMS[weight_dtype]
        return {
            "T5-XXL": gguf_form(T5Encoder, configs.t5, block_type, torch.float16),
            "CLIP-L": on_meta(CLIPTextEncoder, configs.clip, STORED["CLIP-L"], None),
            "transformer": gguf_form(Flux, configs.transformer, block_type, torch.bfloat16, FLUX_UNQUANTIZED),
            "autoencoder": on_meta(AutoEncoder, configs.ae, STORED["autoencoder"], None),
        }
    narrow = local_models.LOAD_DTYPE_OF_OPTION[weight_dtype]
    return {
        "T5-XXL": on_meta(T5Encoder, configs.t5, STORED["T5-XXL"], narrow),
        "CLIP-L": on_meta(CLIPTextEncoder, configs.clip, STORED["CLIP-L"], None),
        "transformer": on_meta(Flux, configs.transformer, STORED["transformer"], narrow),
        "autoencoder": on_meta(AutoEncoder, configs.ae, STORED["autoencoder"], None),
    }


# --- one run of the pipeline --------------------------------------------------------------------


@dataclass
class StageMemory:
    """One stage of a run: its models' bytes, and the activations' peak above them."""

    name: str
    models: list[str]
    weight_bytes: int  # the stage's own models
    weight_bytes_rounded: int
    carried_bytes: int  # live when the stage began (txt, vec, latents of earlier stages)
    activation_peak: int  # the peak of everything not a weight, carried bytes included
    activation_peak_rounded: int
    reserved: int  # what `run_pipeline` tells the memory policy to keep free for the activations
    largest_cast: str = ""
    largest_cast_bytes: int = 0
    peak_tensors: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Its own models plus its activations ("offload to CPU")."""
        return self.weight_bytes + self.activation_peak


@dataclass
class PipelineMemory:
    """A whole run for one weight dtype."""

    weight_dtype: str
    height: int
    width: int
    steps: int
    batch_size: int
    fused_kernels: bool
    model_bytes: dict[str, int]
    model_bytes_rounded: dict[str, int]
    stages: list[StageMemory]
    seconds: float = 0.0
    block_bytes: list[int] = field(default_factory=list)  # the transformer's blocks, in run order

    @property
    def offload_peak(self) -> int:
        """Peak of "offload to CPU" (and of "auto" when it must): the running stage's models only."""
        return max(s.peak for s in self.stages)

    @property
    def keep_peak(self) -> int:
        """Peak of "keep on GPU" from the second run on: every model resident in every stage."""
        return sum(self.model_bytes.values()) + max(s.activation_peak for s in self.stages)


class _StageMarks:
    """Stands in for `local_memory.MemoryPolicy`: moves nothing, marks the stages' bounds."""

    def __init__(self, tracker: LiveTensorTracker, top: int):
        self.tracker, self.top = tracker, top
        self.stages: list[StageMemory] = []
        self._open: dict | None = None

    def enter(self, stage, activation_bytes: int) -> None:
        self.tracker.begin_stage()
        self._open = {"carried": self.tracker.current, "reserved": activation_bytes}

    @contextlib.contextmanager
    def use(self, stage, activation_bytes: int):
        self.enter(stage, activation_bytes)
        yield
        self.leave(stage)

    def leave(self, stage) -> None:
        t, names = self.tracker, [p.name for p in stage]
        cast = t.largest_cast
        self.stages.append(
            StageMemory(
                name=STAGE_NAMES.get(names[0], "+".join(names)),
                models=names,
                weight_bytes=sum(p.nbytes for p in stage),
                weight_bytes_rounded=sum(_rounded_bytes(p.module) for p in stage),
                carried_bytes=self._open["carried"],
                activation_peak=t.peak,
                activation_peak_rounded=t.peak_rounded,
                reserved=self._open["reserved"],
                largest_cast=f"{cast[1]} {cast[0].shape}" if cast else "",
                largest_cast_bytes=cast[0].nbytes if cast else 0,
                peak_tensors=[a.describe() for a in sorted(t.peak_live, key=lambda a: -a.nbytes)[: self.top]],
            )
        )


def _rounded_bytes(module: nn.Module) -> int:
    return sum(allocator_bytes(t.nbytes) for t in [*module.parameters(), *module.buffers()])


class _MetaTokenizer:
    """Token ids of the right shape on the CPU (the values never matter on meta)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), self.length, dtype=torch.long)


def measure(
    weight_dtype: str,
    request: GenerationRequest,
    configs: Configs | None = None,
    *,
    fused_kernels: bool = True,
    top: int = 8,
) -> PipelineMemory:
    """Run `local_pipeline.run_pipeline` on meta models and measure each stage's memory."""
    started = time.monotonic()
    configs = configs or Configs()
    modules = build_models(weight_dtype, configs)
    placed = {name: local_models.Placed(name, m) for name, m in modules.items()}
    models = local_models.LoadedModels(
        files=None,
        stamps=(),
        weight_dtype=weight_dtype,
        t5=placed["T5-XXL"],
        clip=placed["CLIP-L"],
        transformer=placed["transformer"],
        ae=placed["autoencoder"],
        t5_tokenizer=_MetaTokenizer(local_models.T5_MAX_LENGTH),
        clip_tokenizer=_MetaTokenizer(local_models.CLIP_MAX_LENGTH),
    )
    tracker = LiveTensorTracker("meta")
    for name, m in modules.items():
        tracker.add_weights(m, name)
    marks = _StageMarks(tracker, top)
    device, dtype = torch.device("meta"), torch.bfloat16
    progress = Progress(request.steps * request.batch_size)
    real_check = local_pipeline.fused_attention_likely
    local_pipeline.fused_attention_likely = lambda device: fused_kernels  # meta stands in for a GPU
    try:
        with gpu_kernels(fused_kernels), tracker.module_names(), tracker:
            run = local_pipeline.PipelineRun(request, device, dtype, policy=marks, progress=progress)
            local_pipeline.run_pipeline(models, run)
    finally:
        local_pipeline.fused_attention_likely = real_check
    return PipelineMemory(
        weight_dtype=weight_dtype,
        height=request.height,
        width=request.width,
        steps=request.steps,
        batch_size=request.batch_size,
        fused_kernels=fused_kernels,
        model_bytes={name: p.nbytes for name, p in placed.items()},
        model_bytes_rounded={name: _rounded_bytes(m) for name, m in modules.items()},
        stages=marks.stages,
        seconds=time.monotonic() - started,
        block_bytes=[local_models.module_bytes(b) for _p, b in placed["transformer"].blocks()],
    )


# --- the "auto" policy, simulated on measured numbers -------------------------------------------


def simulate_auto(result: PipelineMemory, card_bytes: int, runs: int = 2) -> list[tuple]:
    """`MemoryPolicy.enter` with choice "auto" on a card of `card_bytes`, for `runs` runs.

    Free memory is what `torch.cuda.mem_get_info` would say: the card less the CUDA context, the
    resident models and the allocator's cache (the previous stage's activations, and the blocks of
    models just moved out: `enter` empties the cache only after its loop). Returns one
    (run, stage, resident models, allocated peak) per stage.
    """
    resident: dict[str, int] = {}  # model -> last use (a counter)
    clock, cached, rows = 0, 0, []
    for run in range(1, runs + 1):
        for stage in result.stages:
            need = sum(result.model_bytes[m] for m in stage.models if m not in resident)
            need += stage.reserved
            others = sorted((m for m in resident if m not in stage.models), key=resident.get)
            for m in others:
                used = sum(result.model_bytes[r] for r in resident) + cached
                if card_bytes - CUDA_CONTEXT - used >= need:
                    break
                del resident[m]
                cached += result.model_bytes[m]
            if others:
                cached = 0  # torch.cuda.empty_cache()
            for m in stage.models:
                clock += 1
                resident[m] = clock
            weights = sum(result.model_bytes[m] for m in resident)
            rows.append((run, stage.name, sorted(resident), weights + stage.activation_peak))
            cached = stage.activation_peak - stage.carried_bytes  # freed into the cache
    return rows


def simulate_stream_blocks(result: PipelineMemory, card_bytes: int) -> tuple[int, int]:
    """ "stream blocks" on a card of `card_bytes`: (peak, resident blocks). The other stages run as
    "offload to CPU"; sampling keeps the blocks `local_models.resident_block_count` allows within the
    budget `MemoryPolicy.enter` gives it (the free memory less the reserved activations), plus two
    blocks in flight, plus the measured activations."""
    sampling = next(s for s in result.stages if s.models == ["transformer"])
    blocks = result.block_bytes
    rest = result.model_bytes["transformer"] - sum(blocks)
    reserve = local_memory.sampling_bytes(result.height, result.width, result.fused_kernels)
    budget = max(0, card_bytes - CUDA_CONTEXT - reserve)
    resident = local_models.resident_block_count(rest, blocks, budget)
    in_flight = 0 if resident == len(blocks) else 2 * max(blocks)
    sampling_peak = rest + sum(blocks[:resident]) + in_flight + sampling.activation_peak
    others = max((s.peak for s in result.stages if s is not sampling), default=0)
    return max(sampling_peak, others), resident


# --- report -------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:6.2f}"


def verdict(peak: int, target: int) -> str:
    margin = target - peak
    word = "within" if margin >= 0 else "OVER"
    if target % GIB == 0:  # a target given in GiB
        return f"{word} {target // GIB} GiB by {abs(margin) / GIB:.2f} GiB"
    return f"{word} {target / 1e9:.0f} GB ({target / GIB:.2f} GiB) by {abs(margin) / GIB:.2f} GiB"


def report(result: PipelineMemory, cards: list[float], out=sys.stdout) -> None:
    r = result
    kernels = "fused GPU kernels" if r.fused_kernels else "meta's own SDPA/RMS norm (math path)"
    print(
        f"\n=== weights {r.weight_dtype}: {r.width}x{r.height}, batch {r.batch_size}, {r.steps} "
        f"steps, compute bf16, {kernels} (measured in {r.seconds:.1f} s)",
        file=out,
    )
    models = ", ".join(f"{name} {gib(b).strip()}" for name, b in r.model_bytes.items())
    print(f"model weights (GiB): {models}; total {gib(sum(r.model_bytes.values())).strip()}", file=out)
    print(
        f"{'stage':<14} {'weights':>8} {'activ.':>8} {'peak':>8} {'peak*':>8} "
        f"{'reserved':>13}  largest weight cast (transient, inside the activations)",
        file=out,
    )
    for s in r.stages:
        rounded = s.weight_bytes_rounded + s.activation_peak_rounded
        cast = f"{s.largest_cast_bytes / MIB:.1f} MiB {s.largest_cast}" if s.largest_cast else "-"
        print(
            f"{s.name:<14} {gib(s.weight_bytes):>8} {gib(s.activation_peak):>8} "
            f"{gib(s.peak):>8} {gib(rounded):>8} {gib(s.reserved):>13}  {cast}",
            file=out,
        )
    print("(GiB; peak* = with the caching allocator's block rounding)", file=out)
    target = TARGETS.get(r.weight_dtype)
    for label, peak in (('"offload to CPU"', r.offload_peak), ('"keep on GPU"', r.keep_peak)):
        line = f"pipeline peak, {label:<18} {gib(peak)} GiB"
        if target:
            line += f"  {verdict(peak, target)}"
        print(line, file=out)
    for card in cards:
        card_bytes = int(card * GIB)
        rows = simulate_auto(r, card_bytes)
        peak = max(row[3] for row in rows)
        room = card_bytes - CUDA_CONTEXT - peak
        fits = f"fits, {room / GIB:.2f} GiB to spare" if room >= 0 else "OUT OF MEMORY"
        print(
            f'pipeline peak, "auto" on a {card:g} GiB card: {gib(peak)} GiB  ({fits} with a '
            f"{CUDA_CONTEXT / GIB:.1f} GiB CUDA context)",
            file=out,
        )
        for run, stage, resident, allocated in rows:
            print(
                f"    run {run} {stage:<14} {gib(allocated)} GiB, on the GPU: {', '.join(resident)}", file=out
            )
    for card in cards:
        card_bytes = int(card * GIB)
        peak, resident = simulate_stream_blocks(r, card_bytes)
        room = card_bytes - CUDA_CONTEXT - peak
        fits = f"fits, {room / GIB:.2f} GiB to spare" if room >= 0 else "OUT OF MEMORY"
        print(
            f'pipeline peak, "stream blocks" on a {card:g} GiB card: {gib(peak)} GiB, '
            f"{resident} of {len(r.block_bytes)} blocks resident  ({fits})",
            file=out,
        )
    for s in r.stages:
        print(f"live at the {s.name} peak (largest first):", file=out)
        for line in s.peak_tensors:
            print(f"    {line}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--weight-dtype",
        nargs="+",
        default=["fp8_e4m3fn", "bf16", "gguf-Q8_0", "gguf-Q4_K_S"],
        choices=WEIGHT_FORMS,
    )
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="keep meta's SDPA (math path, L x L scores) and composite RMS norm",
    )
    parser.add_argument(
        "--cards",
        type=float,
        nargs="*",
        default=[8.0, 12.0, 16.0, 24.0],
        help="card sizes in GiB for the 'auto' simulation",
    )
    parser.add_argument("--top", type=int, default=8, help="live tensors listed at each peak")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    request = GenerationRequest(
        prompt="a photo of a cat",
        width=args.width,
        height=args.height,
        steps=args.steps,
        batch_size=args.batch_size,
    ).validate("local")
    results = []
    for weight_dtype in args.weight_dtype:
        result = measure(weight_dtype, request, fused_kernels=not args.native_kernels, top=args.top)
        report(result, args.cards)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
