"""FLUX Schnell Generate as an async node: independent nodes overlap, Cancel stops every node that is
waiting, and the node shows what it is doing while it waits (ComfyUI's progress text).

The node runs as ComfyUI (0.3.45 and later) runs an `async def` node function: as a task in the
executor's event loop. Requests go to the loopback fake ImageAPI; ComfyUI is the stand-in of
tests/support/comfy_stand_in.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from support import TEST_KEY
from support.fake_imageapi import Reply, error_reply, request_image

SLOW_S = 30.0  # a service that would answer only after the test had failed


def _args(prompt: str, batch: int = 1, node_id: str = "1") -> dict:
    return {
        "prompt": prompt,
        "backend": "api",
        "width": 256,
        "height": 256,
        "num_inference_steps": 4,
        "seed": 0,
        "batch_size": batch,
        "unique_id": node_id,
    }


async def _until(condition, limit_s: float = 20.0) -> None:
    """Let the event loop run until `condition()` holds (a generous bound, not a timing check)."""
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def test_the_node_function_is_async(node):
    import inspect

    assert inspect.iscoroutinefunction(node.generate)
    assert node.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_two_nodes_wait_for_the_service_at_the_same_time(comfy, node, fake_api):
    fake_api.delay_s = 0.5

    async def two_nodes():
        return await asyncio.gather(
            node.generate(**_args("a fox", node_id="1")), node.generate(**_args("a hare", node_id="2"))
        )

    (fox, _), (hare, _) = asyncio.run(two_nodes())
    assert fox.shape == hare.shape == (1, 256, 256, 3)
    assert fake_api.max_in_flight == 2  # one at a time would never have had two requests open
    assert sorted(node_id for node_id, _ in comfy.bar_updates) == ["1", "2"]  # each node's own bar


def test_each_node_still_bounds_its_own_requests(comfy_package, node, fake_api):
    fake_api.delay_s = 0.3
    asyncio.run(node.generate(**_args("a fox", batch=6)))
    limit = comfy_package.api_client.CONCURRENCY
    assert fake_api.max_in_flight == limit < 6


@pytest.mark.slow  # over 3 s: it waits on a slow service on purpose
def test_cancel_stops_every_waiting_node(comfy, node, fake_api):
    fake_api.delay_s = SLOW_S

    async def cancel_while_waiting():
        tasks = [asyncio.ensure_future(node.generate(**_args(p, node_id=p))) for p in ("fox", "hare")]
        await _until(lambda: fake_api.generate_calls == 2)
        comfy.interrupt()  # the Cancel button: ComfyUI's flag, read by every waiting node
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(cancel_while_waiting())
    assert [type(r) for r in results] == [comfy.mm.InterruptProcessingException] * 2
    assert fake_api.generate_calls == 2
    last = {node_id: text for node_id, text in comfy.texts}
    assert all(text.startswith("cancelled after ") for text in last.values()), last


@pytest.mark.slow  # over 3 s: it waits on a slow service on purpose
def test_cancel_seen_by_one_node_reaches_the_other(comfy, node, fake_api):
    """ComfyUI's own `throw_exception_if_processing_interrupted` clears the flag; the package
    raises ComfyUI's exception itself, so a node that saw the Cancel leaves it for the others."""
    fake_api.delay_s = SLOW_S

    async def cancel_while_waiting():
        first = asyncio.ensure_future(node.generate(**_args("fox", node_id="1")))
        await _until(lambda: fake_api.generate_calls == 1)
        comfy.interrupt()
        with pytest.raises(comfy.mm.InterruptProcessingException):
            await first
        assert comfy.interrupted  # still set for the nodes that have not looked yet
        with pytest.raises(comfy.mm.InterruptProcessingException):
            await node.generate(**_args("hare", node_id="2"))

    asyncio.run(cancel_while_waiting())
    assert fake_api.generate_calls == 1  # the second node sent nothing


def test_a_cancelled_task_sends_no_more_requests(comfy, node, fake_api):
    """ComfyUI cancels the tasks still pending when another node ends the prompt (an error, an
    interrupt); the node's worker thread must then stop sending the rest of its batch."""
    fake_api.delay_s = 1.0

    async def cancel_task():
        task = asyncio.ensure_future(node.generate(**_args("fox", batch=8)))
        await _until(lambda: fake_api.generate_calls == 4)  # the first four places are taken
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_task())  # returns once the worker thread has ended (asyncio.run waits)
    assert fake_api.generate_calls == 4


def test_local_generations_run_one_at_a_time(comfy, comfy_package, tmp_path):
    """Two local nodes awaited together: the second starts after the first finished (the local
    backend runs on the executor's thread, where ComfyUI manages models)."""
    from support.thumbnails import install_tiny_local_models

    install_tiny_local_models(comfy, tmp_path)
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    local = {**_args("a fox"), "backend": "local", "num_inference_steps": 2}

    async def two_local_nodes():
        return await asyncio.gather(
            node.generate(**{**local, "unique_id": "1"}), node.generate(**{**local, "unique_id": "2"})
        )

    (a, _), (b, _) = asyncio.run(two_local_nodes())
    assert a.shape == b.shape == (1, 256, 256, 3)
    assert [node_id for node_id, _ in comfy.bar_updates] == ["1", "1", "2", "2"]


# --- the text on the node ------------------------------------------------------------------------


def test_the_node_shows_what_it_waits_for(comfy, node, fake_api, monkeypatch, comfy_package):
    monkeypatch.setattr(comfy_package.comfy_bridge.progress, "STATUS_INTERVAL_S", 0.05)
    fake_api.delay_s = 0.4
    asyncio.run(node.generate(**_args("a fox", batch=2, node_id="7")))
    assert {node_id for node_id, _ in comfy.texts} == {"7"}
    texts = [text for _, text in comfy.texts]
    assert texts[0] == "waiting for the service: 0 s\n0 of 2 images done"
    assert len(texts) >= 3  # the seconds were shown again while the service took its time
    assert all(t.startswith("waiting for the service: ") for t in texts[:-1])
    assert texts[-1].startswith("2 of 2 images done in ")


def test_the_text_counts_finished_images(comfy, node, fake_api, monkeypatch, comfy_package):
    monkeypatch.setattr(comfy_package.comfy_bridge.progress, "STATUS_INTERVAL_S", 0.02)

    def second_is_slow(req, fake):
        if fake.generate_calls >= 2:
            return Reply.image(request_image(req), delay_s=0.5)
        return Reply.image(request_image(req))

    fake_api.set_default(second_is_slow)
    asyncio.run(node.generate(**_args("a fox", batch=2)))
    texts = [text for _, text in comfy.texts]
    assert any(t.endswith("\n1 of 2 images done") for t in texts), texts


def test_the_text_says_when_the_service_rate_limits(comfy, node, fake_api):
    fake_api.script(error_reply(429, "slow down", retry_after="1"))
    images, _ = asyncio.run(node.generate(**_args("a fox", node_id="3")))
    assert images.shape[0] == 1
    texts = [text for _, text in comfy.texts]
    assert any(t.startswith("rate limited, retrying in 1 s: ") for t in texts), texts
    assert texts[-1].startswith("1 of 1 image done in ")


def test_the_text_never_holds_the_key(comfy, comfy_package, node, fake_api, monkeypatch):
    monkeypatch.setattr(comfy_package.comfy_bridge.progress, "STATUS_INTERVAL_S", 0.02)
    fake_api.set_default(error_reply(401, f"invalid api key {TEST_KEY}", delay_s=0.2))
    with pytest.raises(comfy_package.errors.AuthenticationError):
        asyncio.run(node.generate(**_args("a fox", batch=2)))
    assert comfy.texts
    assert all(TEST_KEY not in text and "sk_" not in text for _, text in comfy.texts)
    assert comfy.texts[-1][1].startswith("failed after ")


def test_status_line_from_an_injected_clock(comfy_package):
    now = [100.0]
    progress = comfy_package.comfy_bridge.Progress(4, unit="image", clock=lambda: now[0])
    progress.set_status("waiting for the service")
    now[0] += 3.4
    assert progress.line() == "waiting for the service: 3 s\n0 of 4 images done"
    progress.advance(2)
    progress.set_status("rate limited, retrying in 3 s")
    now[0] += 1.0
    assert progress.line() == "rate limited, retrying in 3 s: 4 s\n2 of 4 images done"
    progress.status = ""
    assert progress.line() == "2 of 4 images done in 4.4 s"


def test_no_text_outside_comfyui():
    """The command line and scripts: no PromptServer, so nothing is sent and nothing breaks."""
    from comfyui_flux_schnell import comfy_bridge

    progress = comfy_bridge.progress_for(1, node_id="3", unit="image")
    with progress.status_text("waiting for the service"):
        pass
    assert progress.line().startswith("0 of 1 image done in")


def test_info_is_unchanged_by_the_async_path(comfy, node, fake_api):
    _images, info = asyncio.run(node.generate(**_args("a fox", batch=2)))
    data = json.loads(info)
    assert data["seeds"] == [0, 1]
    assert TEST_KEY not in info
