"""Inside ComfyUI the local backend's models join ComfyUI's model management.

ComfyUI is the stand-in of tests/support/comfy_stand_in.py: its `comfy.model_management`
(`current_loaded_models`, `load_models_gpu`, `unload_all_models`) and `comfy.model_patcher`
(`ModelPatcher`, whose own weight moves raise there, so only the package's moves can run) follow
ComfyUI 0.3.64. The models are tiny random-weight FLUX files where 'auto' looks for them.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from support.thumbnails import install_tiny_local_models

SIZE = 256
NETWORKS = ("t5", "clip", "transformer", "ae")


@pytest.fixture
def local_node(comfy, comfy_package, tmp_path):
    install_tiny_local_models(comfy, tmp_path)
    return comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()


def run(node, seed: int = 0, local_model=None):
    images, info = asyncio.run(
        node.generate("a fox", "local", SIZE, SIZE, 2, seed, 1, local_model=local_model, unique_id="5")
    )
    return images, json.loads(info)


def loader(comfy_package, memory: str):
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]()
    (spec,) = node.select("none", "auto", "auto", "auto", "auto", "as stored", memory)
    return spec


def ours(comfy, comfy_package) -> dict[str, object]:
    """network name -> its entry in ComfyUI's loaded models."""
    loaded = comfy_package.local.models.MODEL_CACHE.loaded
    by_module = {id(getattr(loaded, name).module): name for name in NETWORKS}
    return {
        by_module[id(e.model.model)]: e
        for e in comfy.mm.current_loaded_models
        if id(e.model.model) in by_module
    }


def test_comfyui_counts_our_models_after_a_run(comfy, comfy_package, local_node):
    run(local_node)
    entries = ours(comfy, comfy_package)
    assert sorted(entries) == sorted(NETWORKS)
    assert len(comfy.mm.current_loaded_models) == 4
    loaded = comfy_package.local.models.MODEL_CACHE.loaded
    for name, entry in entries.items():
        placed = getattr(loaded, name)
        assert entry.model_memory() == placed.nbytes > 0  # what ComfyUI counts for it
        assert entry.model.loaded_size() == placed.nbytes
        assert entry.model.current_loaded_device() == placed.device
        assert entry.model.load_device.type == "cpu"  # ComfyUI's device (the stand-in's: the CPU)


def test_comfyui_counts_the_new_size_after_a_lora_change(comfy, comfy_package, local_node):
    run(local_node)
    before = {name: e.model_memory() for name, e in ours(comfy, comfy_package).items()}
    lora_node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLoRA"]()
    lora = sorted(p.name for p in (comfy.models_dir / "loras").iterdir())[0]
    (with_lora,) = lora_node.apply(loader(comfy_package, "auto"), lora, 1.0)
    run(local_node, local_model=with_lora)
    loaded = comfy_package.local.models.MODEL_CACHE.loaded
    entries = ours(comfy, comfy_package)
    assert entries["transformer"].model_memory() > before["transformer"]  # the adapters count
    for name, entry in entries.items():
        placed = getattr(loaded, name)
        assert entry.model_memory() == entry.model.loaded_size() == placed.nbytes


def test_each_stage_is_loaded_through_load_models_gpu(comfy, comfy_package, local_node):
    run(local_node)
    memory = comfy_package.local.memory
    loaded = comfy_package.local.models.MODEL_CACHE.loaded
    stages = [([p.model for p in models], needed) for models, needed in comfy.loads]
    assert stages == [
        ([loaded.t5.module, loaded.clip.module], memory.GIB // 2),
        ([loaded.transformer.module], memory.sampling_bytes(SIZE, SIZE, fused_attention=False)),  # CPU
        ([loaded.ae.module], memory.decoding_bytes(SIZE, SIZE)),
    ]


def test_unload_models_releases_ours_and_the_next_run_reads_no_file(
    comfy, comfy_package, local_node, monkeypatch
):
    first, info = run(local_node)
    assert "loading" in info["timings"]
    comfy.mm.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert comfy.mm.current_loaded_models == []
    loaded = comfy_package.local.models.MODEL_CACHE.loaded
    assert all(getattr(loaded, n).patcher.loaded_size() == 0 for n in NETWORKS)

    def no_file_reading(*args, **kwargs):
        raise AssertionError("a weight file was read again")

    package_loading = comfy_package.flux.loading  # the module the backend reads files with
    for name in ("load_transformer", "load_t5", "load_clip", "load_autoencoder", "check_files_compatible"):
        monkeypatch.setattr(package_loading, name, no_file_reading)
    again, info = run(local_node)
    assert "loading" not in info["timings"]
    assert again.equal(first)
    assert sorted(ours(comfy, comfy_package)) == sorted(NETWORKS)  # counted again


def test_a_model_already_loaded_is_not_moved_out_and_in(comfy, comfy_package, local_node, monkeypatch):
    """load_models_gpu takes a model it holds out of its list with detach(unpatch_all=False)
    before loading it again; that must leave the weights where they are."""
    run(local_node)
    moved_out = []
    for name in NETWORKS:
        patcher = getattr(comfy_package.local.models.MODEL_CACHE.loaded, name).patcher
        move_out = patcher._move_out
        monkeypatch.setattr(patcher, "_move_out", lambda n=name, f=move_out: (moved_out.append(n), f())[1])
    run(local_node, seed=1)
    assert moved_out == []
    assert len(comfy.mm.current_loaded_models) == 4


@pytest.mark.parametrize("memory", ["offload to CPU", "free after run"])
def test_offload_choices_unload_each_stage(comfy, comfy_package, local_node, memory):
    run(local_node, local_model=loader(comfy_package, memory))
    assert comfy.mm.current_loaded_models == []
    assert len(comfy.loads) == 3
    kept = comfy_package.local.models.MODEL_CACHE.loaded
    assert (kept is None) == (memory == "free after run")


@pytest.mark.parametrize("memory", ["auto", "keep on GPU"])
def test_kept_models_stay_for_comfyui_to_unload(comfy, comfy_package, local_node, memory):
    run(local_node, local_model=loader(comfy_package, memory))
    assert len(comfy.mm.current_loaded_models) == 4


def test_other_files_take_ours_out_of_comfyuis_list(comfy, comfy_package, local_node):
    """A run on other weight files (or another dtype) releases the old set, in ComfyUI's list too."""
    run(local_node)
    before = {id(e.model) for e in comfy.mm.current_loaded_models}
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]()
    (bf16,) = node.select("none", "auto", "auto", "auto", "auto", "bf16", "auto")
    run(local_node, local_model=bf16)
    after = {id(e.model) for e in comfy.mm.current_loaded_models}
    assert len(after) == 4
    assert not before & after


def test_outside_comfyui_the_package_keeps_its_own_policy(tmp_path):
    from comfyui_flux_schnell import comfy_bridge
    from comfyui_flux_schnell.local import memory as local_memory

    assert not comfy_bridge.model_management_available()
    assert comfy_bridge.managed_model(None, 1, "cpu", "cpu", print, print) is None
    policy = local_memory.MemoryPolicy.for_run(None, None, "auto")
    assert type(policy) is local_memory.MemoryPolicy
