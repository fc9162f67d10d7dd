"""The local backend end to end on a CPU: tiny random-weight models in every accepted layout."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
from comfyui_flux_schnell import local_backend
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.errors import (
    GenerationInterrupted,
    ModelLoadError,
)
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local import memory as local_memory
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local.files import LocalModelSpec
from PIL import Image
from support.tiny_models import write_tiny_models, write_transformer
from support.tiny_tokenizers import write_comfyui_tree, write_flux_repo_tree

SIZE = 256  # the smallest side the node allows: 16x16 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_flux")
    write_flux_repo_tree(folder)  # tokenizer/ and tokenizer_2/ beside the weights
    return folder


@pytest.fixture(scope="module")
def tiny_bf16(model_dir):
    return write_tiny_models(model_dir, torch.bfloat16)


pytestmark = pytest.mark.usefixtures("fresh_local_cache")


def spec_for(files, model_dir, **fields) -> LocalModelSpec:
    return files.spec(model_dir, **fields)


def run(spec, prompt="a red fox", seed=3, batch=1, steps=2, width=SIZE, height=SIZE):
    request = GenerationRequest(prompt, width, height, steps, seed, batch)
    return local_backend.generate_local(request, spec, Progress(steps * batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("layout", ["single files", "all-in-one"])
def test_every_layout_and_dtype_makes_images(tmp_path, model_dir, dtype, layout):
    files = write_tiny_models(tmp_path, dtype)
    spec = (
        LocalModelSpec(
            checkpoint=files.all_in_one,
            t5_tokenizer=model_dir / "tokenizer_2",
            clip_tokenizer=model_dir / "tokenizer",
        )
        if layout == "all-in-one"
        else spec_for(files, model_dir)
    )
    images, info = run(spec, width=SIZE, height=SIZE + 32)
    assert images.shape == (1, SIZE + 32, SIZE, 3)
    assert images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert 0.0 <= images.min() <= images.max() <= 1.0
    assert images.std() > 0  # not a constant picture
    assert info.backend == "local"
    assert info.seeds == [3]
    assert info.peak_memory_gib is None  # measured on CUDA only
    assert "peak_memory_gib" not in info.to_json()


def test_same_seed_same_image_and_batch_items_equal_single_seeds(tiny_bf16, model_dir):
    spec = spec_for(tiny_bf16, model_dir)
    batch, _ = run(spec, seed=10, batch=3)
    assert batch.shape == (3, SIZE, SIZE, 3)
    again, _ = run(spec, seed=10, batch=1)
    third, _ = run(spec, seed=12, batch=1)
    assert torch.equal(batch[0], again[0])
    assert torch.equal(batch[2], third[0])
    assert not torch.equal(batch[0], batch[1])
    other_prompt, _ = run(spec, prompt="a blue whale", seed=10)
    assert not torch.equal(other_prompt[0], batch[0])


def test_second_run_with_new_prompt_and_seed_reloads_nothing(tiny_bf16, model_dir, monkeypatch):
    from comfyui_flux_schnell.flux import loading

    calls = []
    for name in ("load_transformer", "load_t5", "load_clip", "load_autoencoder"):
        original = getattr(loading, name)
        monkeypatch.setattr(
            loading, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k)
        )
    spec = spec_for(tiny_bf16, model_dir)
    _, first = run(spec, prompt="one", seed=1)
    assert sorted(calls) == ["load_autoencoder", "load_clip", "load_t5", "load_transformer"]
    _, second = run(spec, prompt="two", seed=2)
    assert len(calls) == 4, "the second run loaded a model again"
    assert "loading" in first.timings
    assert "loading" not in second.timings
    run(dataclasses.replace(spec, weight_dtype="fp8_e4m3fn"), seed=2)
    assert len(calls) == 8, "a new weight dtype must reload"


def test_a_file_replaced_under_the_same_name_is_loaded_again(tmp_path, model_dir, monkeypatch):
    """The weights are memory maps of the files: a cached model is reused only while each file is
    the very one it was loaded from (never a stale model, never a map of a rewritten file)."""
    import shutil

    from comfyui_flux_schnell.flux import loading

    files = write_tiny_models(tmp_path, torch.bfloat16)
    loads = []
    original = loading.load_autoencoder
    monkeypatch.setattr(loading, "load_autoencoder", lambda *a, **k: loads.append(1) or original(*a, **k))
    spec = spec_for(files, model_dir)
    first, _ = run(spec)
    run(spec)
    assert len(loads) == 1
    other = write_tiny_models(tmp_path / "other", torch.bfloat16, seed=5)
    replacement = tmp_path / "replacement.safetensors"
    shutil.copyfile(other.transformer, replacement)
    replacement.replace(files.transformer)  # renamed over it: same path, another file
    second, _ = run(spec)
    assert len(loads) == 2
    assert not torch.equal(first, second)


def test_interrupt_stops_between_steps(tiny_bf16, model_dir):
    stop_after = 2
    progress = Progress(8)
    original = progress.advance

    def advance(n=1, preview=None):
        original(n, preview)
        if progress.done == stop_after:
            progress._stop = _Flag()

    progress.advance = advance
    request = GenerationRequest("a fox", SIZE, SIZE, 8, 0, 1)
    with pytest.raises(GenerationInterrupted):
        local_backend.generate_local(request, spec_for(tiny_bf16, model_dir), progress)
    assert progress.done == stop_after  # no step ran after the interrupt


class _Flag:
    def is_set(self):
        return True


def test_node_with_local_backend_and_loader_node(comfy, comfy_package, tiny_bf16, tmp_path):
    write_comfyui_tree(tmp_path / "pkg")
    comfy.comfy.__path__ = [str(tmp_path / "pkg" / "comfy")]
    for folder, path, name in (
        ("diffusion_models", tiny_bf16.transformer, "flux1-schnell.safetensors"),
        ("text_encoders", tiny_bf16.t5, "t5xxl_fp16.safetensors"),
        ("text_encoders", tiny_bf16.clip, "clip_l.safetensors"),
        ("vae", tiny_bf16.ae, "ae.safetensors"),
    ):
        (comfy.models_dir / folder).mkdir(parents=True, exist_ok=True)
        (comfy.models_dir / folder / name).symlink_to(path)
    generate = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    # Nothing plugged in: the usual names in the usual folders.
    images, info = asyncio.run(generate.generate("a fox", "local", SIZE, SIZE, 2, 5, 2))
    assert images.shape == (2, SIZE, SIZE, 3)
    assert json.loads(info)["seeds"] == [5, 6]
    assert [(value, total) for value, total, _ in comfy.updates] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # The loader node's choice.
    loader = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]()
    (model,) = loader.select(
        "none",
        "flux1-schnell.safetensors",
        "t5xxl_fp16.safetensors",
        "clip_l.safetensors",
        "ae.safetensors",
        "as stored",
        "offload to CPU",
    )
    same, _ = asyncio.run(generate.generate("a fox", "local", SIZE, SIZE, 2, 5, 1, local_model=model))
    assert torch.equal(same[0], images[0])


def test_comfyui_interrupt_raises_comfyuis_exception(comfy, comfy_package, tiny_bf16, model_dir):
    spec = spec_for(tiny_bf16, model_dir)
    generate = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    comfy.interrupt()
    with pytest.raises(comfy.mm.InterruptProcessingException):
        asyncio.run(generate.generate("a fox", "local", SIZE, SIZE, 4, 0, 1, local_model=spec))
    assert comfy.updates == []


def test_missing_files_name_what_was_looked_for(comfy, comfy_package):
    generate = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    errors = comfy_package.errors  # the classes of the package as ComfyUI loaded it
    with pytest.raises(errors.LocalBackendUnavailable, match="flux1-schnell") as info:
        asyncio.run(generate.generate("a fox", "local", SIZE, SIZE, 4, 0, 1))
    assert "models/diffusion_models" in str(info.value)


def test_wrong_file_in_a_slot_says_what_it_is(tiny_bf16, model_dir, tmp_path):
    dev = write_transformer(tmp_path / "flux1-dev.safetensors", torch.bfloat16, dev=True)
    with pytest.raises(ModelLoadError, match=r"(?i)dev"):
        run(dataclasses.replace(spec_for(tiny_bf16, model_dir), transformer=dev))
    swapped = dataclasses.replace(spec_for(tiny_bf16, model_dir), transformer=tiny_bf16.t5)
    with pytest.raises(ModelLoadError, match=r"(?i)t5"):
        run(swapped)


def test_size_not_multiple_of_16_is_refused_before_loading(tiny_bf16, model_dir):
    with pytest.raises(ValueError, match="multiple of 16"):
        run(spec_for(tiny_bf16, model_dir), width=SIZE + 8)
    assert local_models.MODEL_CACHE.loaded is None


def test_latent_preview_is_a_small_picture():
    from comfyui_flux_schnell.flux.preview import latent_preview

    picture = latent_preview(torch.randn(1, 16, 32, 48))
    assert isinstance(picture, Image.Image)
    assert picture.size == (48, 32)


def test_out_of_memory_names_the_stage_and_what_to_change(tiny_bf16, model_dir, monkeypatch):
    from comfyui_flux_schnell.errors import OutOfMemoryError
    from comfyui_flux_schnell.flux import conditioning

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(conditioning, "encode_prompts", no_memory)
    with pytest.raises(OutOfMemoryError) as info:
        run(spec_for(tiny_bf16, model_dir))
    message = str(info.value)
    assert "out of memory on the GPU during text encoding at 256x256" in message
    assert "fp8_e4m3fn" in message
    assert "offload to CPU" in message
    assert isinstance(info.value, MemoryError)
    assert info.value.__cause__ is None  # torch's traceback would keep the activations alive


def test_out_of_memory_inside_comfyui_unloads_every_model(comfy, tiny_bf16, model_dir, monkeypatch):
    """ComfyUI's executor unloads all models on torch's out-of-memory error; ours is another type,
    so the backend does the same itself."""
    from comfyui_flux_schnell.errors import OutOfMemoryError
    from comfyui_flux_schnell.flux import conditioning

    unloads = []
    monkeypatch.setattr(comfy.mm, "unload_all_models", lambda: unloads.append(1), raising=False)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(conditioning, "encode_prompts", no_memory)
    with pytest.raises(OutOfMemoryError):
        run(spec_for(tiny_bf16, model_dir))
    assert unloads == [1]


def test_a_model_that_does_not_fit_is_moved_back_whole(tiny_bf16):
    from comfyui_flux_schnell.flux.loading import load_clip

    placed = local_models.Placed("CLIP-L", load_clip(tiny_bf16.clip))
    homes = {name: t.data_ptr() for name, t in placed.cpu_tensors.items()}
    moved = []

    def fail_on_third(self, *args, **kwargs):
        moved.append(1)
        if len(moved) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return self.clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", fail_on_third)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            placed.to(torch.device("meta"))
    assert placed.device.type == "cpu"
    assert {n: t.data_ptr() for n, t in placed._tensors()} == homes


def test_free_after_run_releases_the_models_and_returns(tiny_bf16, model_dir):
    spec = spec_for(tiny_bf16, model_dir, memory="free after run")
    done = []
    worker = __import__("threading").Thread(target=lambda: done.append(run(spec)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done, "generate_local did not return (a lock held twice?)"
    assert local_models.MODEL_CACHE.loaded is None


def test_a_new_file_set_releases_the_old_one_first(tiny_bf16, model_dir, monkeypatch):
    run(spec_for(tiny_bf16, model_dir))
    old = local_models.MODEL_CACHE.loaded
    homed = []
    for placed in old.all():
        monkeypatch.setattr(placed, "home", lambda p=placed: homed.append(p.name))
    run(spec_for(tiny_bf16, model_dir, weight_dtype="fp8_e4m3fn"))
    assert sorted(homed) == sorted(p.name for p in old.all())
    assert local_models.MODEL_CACHE.loaded is not old


class _FakePlaced:
    def __init__(self, name, nbytes, device):
        self.name, self.nbytes, self.device, self.last_used = name, nbytes, device, 0.0
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        self.device = device

    def home(self):
        self.moves.append("cpu")
        self.device = torch.device("cpu")


@pytest.mark.parametrize(
    ("choice", "free", "expected_home"),
    [
        ("auto", None, True),  # free memory unknown (not CUDA, no ComfyUI): make room
        ("auto", 10 * 2**30, False),  # plenty free: keep the other model
        ("keep on GPU", None, False),
        ("offload to CPU", 10 * 2**30, True),
    ],
)
def test_memory_policy_on_a_non_cuda_device(monkeypatch, choice, free, expected_home):
    device = torch.device("meta")  # stands in for mps/xpu: any device that is not the CPU
    monkeypatch.setattr(local_memory, "free_bytes", lambda d: free)
    monkeypatch.setattr(local_memory, "empty_cache", lambda: None)
    t5, transformer = _FakePlaced("T5", 2**30, device), _FakePlaced("transformer", 2**30, None)
    models = type("M", (), {"all": lambda self: [t5, transformer]})()
    policy = local_memory.MemoryPolicy(models, device, choice)
    with policy.use([transformer], activation_bytes=2**20):
        assert transformer.device == device
    assert ("cpu" in t5.moves) is expected_home
    assert (transformer.device.type == "cpu") is (choice == "offload to CPU")


def _three_stage_run(policy, t5, transformer, ae):
    for stage in ([t5], [transformer], [ae]):
        with policy.use(stage, activation_bytes=2**20):
            pass


@pytest.mark.parametrize(
    ("choice", "free", "expected_calls"),
    [
        ("auto", 10 * 2**30, 0),  # everything fits: nothing moves, the cache is left alone (was 5)
        ("auto", None, 2),  # free memory unknown: the others move out before stages 2 and 3
        ("keep on GPU", None, 0),
        ("offload to CPU", None, 0),  # each stage went home on leaving: nothing on the device to move
    ],
)
def test_allocator_cache_is_emptied_only_when_a_model_moved_out(monkeypatch, choice, free, expected_calls):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    monkeypatch.setattr(local_memory, "free_bytes", lambda d: free)
    device = torch.device("meta")
    t5, transformer, ae = (_FakePlaced(n, 2**30, torch.device("cpu")) for n in ("T5", "transformer", "AE"))
    models = type("M", (), {"all": lambda self: [t5, transformer, ae]})()
    _three_stage_run(local_memory.MemoryPolicy(models, device, choice), t5, transformer, ae)
    assert len(calls) == expected_calls


def test_auto_empties_the_cache_once_before_moving_a_model_out(monkeypatch):
    """Cached blocks count as free memory once emptied: a model moves out only if that is not enough."""
    calls, frees = [], iter([2**29, 4 * 2**30])  # short before emptying, enough after
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    monkeypatch.setattr(local_memory, "free_bytes", lambda d: next(frees))
    device = torch.device("meta")
    t5, transformer = _FakePlaced("T5", 2**30, device), _FakePlaced("transformer", 2**30, torch.device("cpu"))
    models = type("M", (), {"all": lambda self: [t5, transformer]})()
    with local_memory.MemoryPolicy(models, device, "auto").use([transformer], activation_bytes=2**20):
        pass
    assert calls == [1]
    assert t5.moves == []


def test_files_that_do_not_belong_together_are_refused_before_loading(
    tiny_bf16, model_dir, tmp_path, monkeypatch
):
    from dataclasses import replace as dc_replace

    from comfyui_flux_schnell.flux import loading
    from support.tiny_models import TINY_CLIP, clip_weights, save

    wide_clip = save(
        tmp_path / "clip_g.safetensors",
        clip_weights(dc_replace(TINY_CLIP, hidden_size=128, num_heads=2)),
        torch.bfloat16,
    )
    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ModelLoadError, match="do not belong together") as info:
        run(dataclasses.replace(spec_for(tiny_bf16, model_dir), clip=wide_clip))
    assert "clip_g.safetensors" in str(info.value)


def test_previews_when_comfyui_asks_for_them(comfy, comfy_package, tiny_bf16, model_dir, monkeypatch):
    monkeypatch.setattr(comfy_package.comfy_bridge, "previews_enabled", lambda: True)
    generate = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    spec = spec_for(tiny_bf16, model_dir)
    asyncio.run(generate.generate("a fox", "local", SIZE, SIZE + 64, 3, 1, 1, local_model=spec))
    assert [u[0] for u in comfy.updates] == [1, 2, 3]
    for _, _, preview in comfy.updates:
        kind, picture, max_size = preview
        assert (kind, max_size) == ("JPEG", 512)
        assert picture.size == (SIZE // 8, (SIZE + 64) // 8)


@pytest.mark.parametrize("memory", ["auto", "free after run"])
def test_compile_compiles_each_block_and_a_second_run_keeps_dynamos_code(
    tiny_bf16, model_dir, monkeypatch, memory
):
    """Per-block compile (backend "eager" to keep the test fast); no `torch._dynamo.reset()` per run."""
    import weakref

    from comfyui_flux_schnell.local import pipeline as local_pipeline

    monkeypatch.setattr(local_pipeline, "COMPILE_BACKEND", "eager")
    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    local_models.MODEL_CACHE.release()
    resets.clear()
    spec = spec_for(tiny_bf16, model_dir, memory=memory, compile=True)
    compiled_calls = []
    first, _ = run(spec)
    loaded = local_models.MODEL_CACHE.loaded
    if memory == "auto":
        transformer = loaded.transformer.module
        blocks = [*transformer.double_blocks, *transformer.single_blocks]
        assert blocks
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert transformer._compiled_call_impl is None  # the blocks, not the whole model
        assert loaded.compiled == "eager"
        for b in blocks:
            monkeypatch.setattr(b, "_compiled_call_impl", _counting(b._compiled_call_impl, compiled_calls))
    else:
        assert loaded is None  # released after the run
    old = weakref.ref(local_models.MODEL_CACHE.loaded) if loaded is not None else None
    second, _ = run(spec)
    assert resets == []
    assert torch.equal(first, second)
    if memory == "auto":
        assert old() is not None
        assert compiled_calls  # the second run went through the compiled blocks
    local_models.MODEL_CACHE.release()
    uncompiled, _ = run(spec_for(tiny_bf16, model_dir, memory=memory))
    assert torch.equal(first, uncompiled)  # the eager backend runs the same kernels
    local_models.MODEL_CACHE.release()


def _counting(fn, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted
