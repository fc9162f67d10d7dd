"""Whole-model moves onto the device go through pinned staging buffers, non-blocking (`PinnedStaging`).

No GPU here: the pinned path is switched on with stand-ins (`pin` returns a copy whose storage is
marked as pinned, `copy` records its source and keywords before copying, `record` hands out tickets
that log their waits), and the "device" is `cpu:0`, a device other than the models' `cpu` home, so
`Placed.to` moves real bytes into new tensors that can be compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local.memory import STAGING, PinnedStaging
from test_model import make_inputs, run_flux, tiny_flux

DEVICE = torch.device("cpu", 0)  # stands for the CUDA device: not the models' home, so they move


class _Ticket:
    def __init__(self, log, slot):
        self.log, self.slot = log, slot

    def synchronize(self):
        self.log.append(("wait", self.slot))


class _FakePinnedPath:
    """Seams for `PinnedStaging` that mark what they pin and record every device copy."""

    def __init__(self):
        self.pinned_storages: set[int] = set()
        self.copies: list[dict] = []
        self.log: list[tuple] = []

    def staging(self, **kw) -> PinnedStaging:
        self.staging_ = PinnedStaging(
            pin=self.pin, pinned=self.is_pinned, copy=self.copy, record=self.record, enabled=True, **kw
        )
        return self.staging_

    def pin(self, t):
        pinned = t.clone()
        self.pinned_storages.add(pinned.untyped_storage().data_ptr())
        return pinned

    def is_pinned(self, t):
        return t.untyped_storage().data_ptr() in self.pinned_storages

    def copy(self, dst, src, **kw):
        self.copies.append({"pinned": self.is_pinned(src), "nbytes": src.numel() * src.element_size(), **kw})
        slot = next((i for i, b in enumerate(self.staging_.buffers) if _within(src, b)), None)
        self.log.append(("copy", slot))
        return dst.copy_(src)

    def record(self, device):
        slot = self.staging_.slot
        self.log.append(("record", slot))
        return _Ticket(self.log, slot)


def _within(view, buffer) -> bool:
    start = buffer.data_ptr()
    return start <= view.data_ptr() < start + buffer.numel()


def _forward(model):
    x = make_inputs(model.params, 1, "txt2img", seed=4)
    with torch.inference_mode():
        return run_flux(model, x, x["img"], torch.tensor([0.5]))


def _bytes(t):
    return t.detach().reshape(-1).view(torch.uint8)


def test_moving_a_model_copies_every_tensor_from_pinned_memory_non_blocking_bit_for_bit():
    model = tiny_flux(seed=2)
    expected = _forward(model)
    fake = _FakePinnedPath()
    placed = local_models.Placed("transformer", model)
    placed.staging = fake.staging(chunk_bytes=4096)  # small buffers: tensors span several, buffers reused
    before = {n: t.clone() for n, t in placed.cpu_tensors.items()}
    placed.to(DEVICE)
    total = sum(t.numel() * t.element_size() for t in before.values())
    assert fake.copies
    assert all(c["pinned"] and c["non_blocking"] is True for c in fake.copies)
    assert sum(c["nbytes"] for c in fake.copies) == total  # every byte, through a pinned buffer
    assert max(c["nbytes"] for c in fake.copies) <= 4096
    for name, t in placed._tensors():  # on the "device": new tensors, the same bits
        assert t.data_ptr() != placed.cpu_tensors[name].data_ptr()
        assert torch.equal(_bytes(t), _bytes(before[name])), name
    assert torch.equal(_forward(model), expected)
    placed.home()
    assert all(t.data_ptr() == placed.cpu_tensors[n].data_ptr() for n, t in placed._tensors())
    assert all(torch.equal(_bytes(placed.cpu_tensors[n]), _bytes(t)) for n, t in before.items())
    assert torch.equal(_forward(model), expected)


def test_a_staging_buffer_is_written_again_only_after_waiting_for_the_copies_that_read_it():
    fake = _FakePinnedPath()
    staging = fake.staging(chunk_bytes=1024, slots=2)
    src = torch.arange(5000, dtype=torch.float32)  # 20000 bytes: 20 buffer fills over 2 buffers
    with staging.copies(DEVICE) as move:
        out = move(src)
    assert torch.equal(out, src)
    seen_record: dict[int, int] = {}
    waited: set[int] = set()
    for i, (what, slot) in enumerate(fake.log):
        if what == "record":
            seen_record[slot] = i
            waited.discard(slot)
        elif what == "wait":
            waited.add(slot)
        elif what == "copy" and slot in seen_record:  # the buffer was filled before: waited for since
            assert slot in waited, fake.log[: i + 1]
    assert fake.log[-2:] == [("record", 1), ("wait", 0)]  # the 20th fill (buffer 1) is closed on leaving
    assert ("wait", 0) in fake.log
    assert ("wait", 1) in fake.log


def test_odd_dtypes_and_already_pinned_tensors_round_trip_bit_for_bit():
    fake = _FakePinnedPath()
    staging = fake.staging(chunk_bytes=1000)
    g = torch.Generator().manual_seed(0)
    fp8 = torch.randn(37, 29, generator=g).to(torch.float8_e4m3fn)
    gguf_bytes = torch.randint(0, 256, (12, 210), dtype=torch.uint8, generator=g)  # a GGUF layer's blocks
    bf16 = torch.randn(333, generator=g).to(torch.bfloat16)
    pinned = fake.pin(torch.randn(64, generator=g))
    with staging.copies(DEVICE) as move:
        moved = [move(t) for t in (fp8, gguf_bytes, bf16, pinned)]
    for a, b in zip((fp8, gguf_bytes, bf16, pinned), moved, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(_bytes(a), _bytes(b))
    assert fake.copies[-1] == {"pinned": True, "nbytes": 256, "non_blocking": True}  # straight, unstaged


def test_offload_round_trips_copy_through_two_bounded_buffers_and_pin_no_model_wholesale():
    fake = _FakePinnedPath()
    staging = fake.staging(chunk_bytes=8192)
    stages = [local_models.Placed(n, tiny_flux(seed=i)) for i, n in enumerate(("T5", "transformer", "AE"))]
    for placed in stages:
        placed.staging = staging
    sources = [{n: t.data_ptr() for n, t in p.cpu_tensors.items()} for p in stages]
    for _run in range(2):  # "offload to CPU": each stage's model in, then home again
        for placed in stages:
            fake.copies.clear()
            placed.to(DEVICE)
            assert sum(c["nbytes"] for c in fake.copies) == placed.nbytes
            assert all(c["pinned"] and c["non_blocking"] is True for c in fake.copies)
            placed.home()
            assert placed.device == torch.device("cpu")
    assert len(fake.pinned_storages) == 2  # the two staging buffers: host RAM bounded by 2 x 8 KiB
    assert [{n: t.data_ptr() for n, t in p.cpu_tensors.items()} for p in stages] == sources  # not replaced


def test_without_cuda_moves_are_plain_non_blocking_to_calls_as_before():
    assert not PinnedStaging().uses(torch.device("cpu"))
    assert not PinnedStaging().uses(torch.device("meta"))
    if not torch.cuda.is_available():
        assert not PinnedStaging().uses(torch.device("cuda"))
    model = tiny_flux(seed=1)
    placed = local_models.Placed("CLIP-L", model)
    assert placed._staging() is STAGING
    placed.to(DEVICE)  # `t.to(device, non_blocking=True)`, no pinned buffer
    assert all(torch.equal(t, placed.cpu_tensors[n]) for n, t in placed._tensors())
    assert STAGING.buffers == []
    placed.home()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_onto_cuda_stage_through_pinned_buffers_and_compute_sees_the_weights():
    model = tiny_flux(seed=5)
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    placed = local_models.Placed("transformer", model)
    placed.staging = PinnedStaging(chunk_bytes=4096)  # many buffer fills and reuses
    cuda = torch.device("cuda")
    assert placed.staging.uses(cuda)
    placed.to(cuda)
    assert all(b.is_pinned() for b in placed.staging.buffers)
    assert len(placed.staging.buffers) == 2
    for name, t in placed._tensors():  # read on the current stream, after the queued copies
        assert torch.equal(_bytes(t).cpu(), _bytes(before[name])), name
    placed.home()
    assert all(t.device.type == "cpu" for _n, t in placed._tensors())
