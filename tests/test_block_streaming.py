"""Low-VRAM loads: the transformer's blocks beyond a budget stay on the CPU and stream in as they run.

On the CPU the default copies are no-ops (CPU to CPU), so the order and the results are proved with
`BlockStreamer`'s injectable copy functions making real copies; CUDA's side stream and events are
the same calls on a GPU (`gpu`-marked test below).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local.memory import BlockStreamer
from test_model import make_inputs, run_flux, tiny_flux


def _model_and_inputs():
    model = tiny_flux(seed=3, depth=2, depth_single_blocks=6)
    x = make_inputs(model.params, 1, "txt2img", seed=4)
    return model, x


def _two_steps(model, x) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [run_flux(model, x, x["img"], t) for t in (torch.tensor([0.75]), torch.tensor([0.3]))]


def _blocks(model):
    return [*model.double_blocks, *model.single_blocks]


class _Recorder:
    """Copy functions that make real copies and record the order of copies and block runs."""

    def __init__(self, blocks):
        self.blocks, self.events = blocks, []
        self.sources = [{n: t.data for n, t in [*b.named_parameters(), *b.named_buffers()]} for b in blocks]

    def copy_in(self, i):
        self.events.append(("in", i))
        for name, t in self.blocks[i].named_parameters():
            t.data = self.sources[i][name].clone()
        return None

    def copy_out(self, i):
        self.events.append(("out", i))
        for name, t in self.blocks[i].named_parameters():
            t.data = self.sources[i][name]

    def on_run(self, i):
        def hook(module, args):
            moved = all(t.data_ptr() != self.sources[i][n].data_ptr() for n, t in module.named_parameters())
            self.events.append(("run", i) if moved else ("run from the CPU copy", i))

        return hook


def test_streamed_forward_equals_resident_bit_for_bit_and_prefetches_the_next_block():
    model, x = _model_and_inputs()
    resident = _two_steps(model, x)
    blocks = _blocks(model)
    rec = _Recorder(blocks)
    streamer = BlockStreamer(blocks, rec.sources, torch.device("cpu"), rec.copy_in, rec.copy_out)
    streamer.attach()
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(rec.on_run(i))
    streamed = _two_steps(model, x)
    streamer.detach()
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed, strict=True))
    n = len(blocks)
    step = []
    for i in range(n):  # block i runs with block i+1's copy already started (the last: the first's)
        step += [("in", (i + 1) % n), ("run", i), ("out", i)]
    assert rec.events == [("in", 0), *step, *step, ("out", 0)]


def test_placed_to_with_a_budget_keeps_the_first_blocks_resident_and_streams_the_rest():
    model, x = _model_and_inputs()
    resident = _two_steps(model, x)
    placed = local_models.Placed("transformer", model)
    blocks = _blocks(model)
    block_bytes = [local_models.module_bytes(b) for b in blocks]
    rest = placed.nbytes - sum(block_bytes)
    in_flight = 2 * max(block_bytes)  # the running block and the next one's copy
    budget = rest + sum(block_bytes[:2]) + in_flight  # the non-block layers and two blocks
    loaded = placed.to(torch.device("cpu"), budget=budget)
    assert placed.streamer is not None
    assert placed.streamer.blocks == blocks[2:]
    assert loaded == budget - in_flight
    assert all(torch.equal(a, b) for a, b in zip(resident, _two_steps(model, x), strict=True))
    placed.to(torch.device("cpu"))  # no budget: everything resident, no streaming
    assert placed.streamer is None
    placed.home()
    assert {n: t.data_ptr() for n, t in placed._tensors()} == {
        n: t.data_ptr() for n, t in placed.cpu_tensors.items()
    }


def test_partially_load_with_comfyuis_budget_keeps_n_blocks_resident(comfy):
    model, x = _model_and_inputs()
    expected = _two_steps(model, x)
    placed = local_models.Placed("transformer", model)
    blocks = _blocks(model)
    block_bytes = [local_models.module_bytes(b) for b in blocks]
    resident = placed.nbytes - sum(block_bytes) + sum(block_bytes[:3])
    patcher = placed.managed(torch.device("cpu"))
    gained = patcher.partially_load(torch.device("cpu"), extra_memory=resident + 2 * max(block_bytes))
    assert placed.streamer.blocks == blocks[3:]  # 3 blocks resident, 5 streamed
    assert gained == patcher.loaded_size() == resident < patcher.model_size()
    assert all(torch.equal(a, b) for a, b in zip(expected, _two_steps(model, x), strict=True))
    patcher.partially_load(torch.device("cpu"), extra_memory=1e32)  # more room: all of it
    assert placed.streamer is None
    assert patcher.loaded_size() == patcher.model_size()
    patcher.detach()
    assert placed.streamer is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_forward_on_cuda_equals_resident():
    model, x = _model_and_inputs()
    placed = local_models.Placed("transformer", model)
    cuda = torch.device("cuda")
    placed.to(cuda)
    xs = {k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    resident = _two_steps(model, xs)
    placed.home()
    placed.to(cuda, budget=placed.nbytes // 2)
    assert placed.streamer is not None
    assert all(t.is_pinned() for src in placed.streamer.sources for t in src.values())
    streamed = _two_steps(model, xs)
    placed.home()
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed, strict=True))


def test_resident_block_count_keeps_room_for_two_blocks_in_flight():
    assert local_models.resident_block_count(10, [5, 5, 5], 25) == 3  # everything fits: no streaming
    assert local_models.resident_block_count(10, [5, 5, 5], 24) == 0  # 10 + 2*5 in flight leaves 4
    assert local_models.resident_block_count(10, [5, 5, 5, 5, 5], 30) == 2


@pytest.mark.parametrize("flag", ["auto", "keep-on-GPU", "offload-to-CPU", "free-after-run", "stream-blocks"])
def test_memory_flag_reaches_the_local_model_spec(flag):
    from comfyui_flux_schnell import cli
    from comfyui_flux_schnell.local.files import MEMORY_CHOICES

    args = cli.build_parser().parse_args(
        ["generate", "--prompt", "a fox", "--backend", "local", "--memory", flag]
    )
    spec = cli._local_model_spec(args)
    assert spec.memory == flag.replace("-", " ")
    assert [f.replace("-", " ") for f in cli.LOCAL_MEMORY_FLAGS] == list(MEMORY_CHOICES)


def test_stream_blocks_policy_streams_the_transformer_within_the_free_memory(monkeypatch):
    from comfyui_flux_schnell.local import memory as local_memory

    model, _x = _model_and_inputs()
    placed = local_models.Placed("transformer", model)
    blocks = _blocks(model)
    block_bytes = [local_models.module_bytes(b) for b in blocks]
    free = placed.nbytes - sum(block_bytes) + sum(block_bytes[:1]) + 2**20
    monkeypatch.setattr(local_memory, "free_bytes", lambda d: free)
    monkeypatch.setattr(local_memory, "empty_cache", lambda: None)
    moves = []
    monkeypatch.setattr(placed, "to", lambda device, budget=None: moves.append((str(device), budget)))
    models = type("M", (), {"all": lambda self: [placed]})()
    policy = local_memory.MemoryPolicy(models, torch.device("meta"), "stream blocks")
    policy.enter([placed], activation_bytes=2**20)
    assert moves == [("meta", free - 2**20)]
