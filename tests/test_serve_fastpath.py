"""The batching server's hot path: model instances side by side, responses written in one piece, checked
request headers kept per model, and the timeout sweep."""
import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")

from edgexfer.runtime import EdgeModel  # noqa: E402
from edgexfer.runtime.oip import BatchConfig, CoalescingTransport, DynamicBatcher, create_app  # noqa: E402
from edgexfer.runtime.protocol import HEADER_LEN, HeaderCache, HTTPError, infer_response, parse_infer  # noqa: E402
from edgexfer.runtime.server import resolve_models  # noqa: E402
from tests._live import infer_concurrently, live  # noqa: E402


class FakeTransport:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        assert not self.closed
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return self.closed


def test_coalescing_transport_one_write_per_step_in_order():
    async def main():
        fake = FakeTransport()
        t = CoalescingTransport(fake, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"ok")
        assert fake.writes == [] and t.get_write_buffer_size() == 40
        await asyncio.sleep(0)  # the end of the step
        assert fake.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        t.write(b"a")
        await asyncio.sleep(0)
        t.write(b"b")
        t.close()  # flushes before closing
        assert fake.writes[1:] == [b"a", b"b"] and fake.closed
        await asyncio.sleep(0)
        assert len(fake.writes) == 3  # the scheduled flush after close finds nothing left

    asyncio.run(main())


def _binary_body(x, outputs_binary=True):
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": outputs_binary}}]}).encode()
    return head + x.tobytes(), str(len(head))


def test_header_cache_checks_every_body(tiny_run):
    m = EdgeModel(tiny_run / "model.int8.onnx")
    cache = HeaderCache(size=2)
    x = np.random.default_rng(0).standard_normal((2, *m.input_shape)).astype(np.float32)
    body, n = _binary_body(x)
    x1, h1 = parse_infer(body, n, m, cache)
    x2, h2 = parse_infer(body, n, m, cache)
    assert h1 is h2 and len(cache) == 1  # parsed and checked once
    np.testing.assert_array_equal(x1, x)
    np.testing.assert_array_equal(x2, x)
    with pytest.raises(HTTPError) as e:  # same header, too few bytes: still refused
        parse_infer(body[:-4], n, m, cache)
    assert e.value.status == 400 and "binary_data_size" in str(e.value)
    # the response head is made once per row count, and equals the one made without the cache
    outs = m.run(x)
    a, ha = infer_response("tiny", h1, m, outs)
    b, hb = infer_response("tiny", parse_infer(body, n, m)[1], m, outs)
    assert a == b and ha == hb and list(h1.heads) == [2]
    k = int(ha[HEADER_LEN])
    np.testing.assert_array_equal(np.frombuffer(a[k:], "<f4").reshape(2, -1), outs["label"])
    # values inside the JSON are never kept; the cache stays bounded
    js = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                 "data": x.ravel().tolist()}]}).encode()
    parse_infer(js, None, m, cache)
    for rows in (1, 3, 4):
        parse_infer(*_binary_body(x[:1].repeat(rows, 0)), m, cache)
    assert len(cache) == 2


def test_instances_share_the_queue_and_keep_requests_apart(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1,
                     batch=BatchConfig(max_batch_size=4, max_queue_delay_ms=5, instances=2))
    b: DynamicBatcher = app.state.batchers["tiny"]
    assert len(b.models) == 2 and b.models[0].session is not b.models[1].session
    ran = {id(m): 0 for m in b.models}
    for m in b.models:  # count the batches each instance computes
        run = m.run

        def counted(x, run=run, key=id(m)):
            ran[key] += 1
            return run(x)
        m.run = counted
    m = EdgeModel(tiny_run / "model.int8.onnx")
    xs = [np.random.default_rng(i).standard_normal((1 + i % 2, *m.input_shape)).astype(np.float32) for i in range(40)]
    with live(app) as url:
        outs = infer_concurrently(url, "tiny", xs, workers=12)
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o, m.run(x)["label"], atol=1e-5)
    assert sum(b.recent_batches) == sum(len(x) for x in xs) and max(b.recent_batches) <= 4
    assert all(n > 0 for n in ran.values()), ran  # both instances computed batches


def test_gather_joins_rows_in_order_and_falls_back_for_odd_arrays():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3, 4, 4)).astype(np.float32) for n in (1, 2, 1, 3)]
    body = xs[1].tobytes()  # as the server parses it: a read-only view on the request body
    xs[1] = np.frombuffer(body, np.float32).reshape(2, 3, 4, 4)
    items = [(x, None) for x in xs]
    got = DynamicBatcher._gather(items)
    assert got.shape == (7, 3, 4, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.concatenate(xs))
    assert DynamicBatcher._gather(items[:1]) is xs[0]
    odd = [(xs[0], None), (rng.standard_normal((4, 3, 4, 4)).astype(np.float32).transpose(0, 1, 3, 2), None)]
    assert not odd[1][0].flags.c_contiguous
    np.testing.assert_array_equal(DynamicBatcher._gather(odd), np.concatenate([x for x, _ in odd]))
