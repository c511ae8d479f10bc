"""backend="onnxruntime" never serves an old or another model's graph: weights changed after the
first call, settings that are not weights (eps, rope theta, head count) and non-tensor call
arguments all key the graph. Inputs are checked like the torch backend checks them, and the
first export is shared by threads and processes."""
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import wavefront  # noqa: E402
from conftest import N_LAYERS, SEG, VOCAB, ids_for, tiny_armt  # noqa: E402
from wavefront.backends.disk_cache import CacheWarning  # noqa: E402
from wavefront.backends.onnx.model_key import model_key  # noqa: E402
from wavefront.models import LinearRecurrence  # noqa: E402
from wavefront.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.xdist_group("onnxruntime_trust")  # one worker: the module's cache exports the base ARMT once

IDS = ids_for(N_LAYERS + 1, batch=2, short_last=2)  # whole segments and a short one (all in the graph); one
# batch for every ARMT test here, so the module's cache serves the base model's graph to them all


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def armt_cache(tmp_path_factory):
    """One cache for this module's ARMT tests: the base model is exported once (the key is the
    content, so sharing the cache is what a user's later processes do)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path_factory.mktemp("armt_cache")))
        yield


def small_armt(**kw):
    """tiny_armt with 2 layers: each test here exports its graph, and export time grows with the layers."""
    return tiny_armt(torch.float32, n_layers=2, **kw)


def _same_as_torch(fast, model, ids, what):
    with torch.no_grad():
        out, ref = fast(ids), model(ids)
    assert_close(out.logits, ref.logits, 1e-4, what)
    for a, b in zip(out.memory.tensors, ref.memory.tensors):
        assert_close(a, b, 1e-4, f"{what}: memory")
    return out, ref


def test_the_key_covers_settings_that_are_not_weights():
    base = tiny_armt(torch.float32)
    for change in ({"norm_eps": 1e-2}, {"rope_theta": 500.0}, {"n_heads": 4}):
        other = tiny_armt(torch.float32, **change)
        sd, other_sd = base.state_dict(), other.state_dict()
        assert sd.keys() == other_sd.keys() and all(torch.equal(sd[k], other_sd[k]) for k in sd)
        assert model_key(other, ("segments", 2)) != model_key(base, ("segments", 2)), change


@pytest.mark.hf
def test_the_key_covers_a_hugging_face_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(**change):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, **change)).eval()
    base = llama()
    for change in ({"rms_norm_eps": 1e-2}, {"rope_theta": 500.0}, {"attention_dropout": 0.5}):
        other = llama(**change)
        assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), other.state_dict().values()))
        assert model_key(other, ("segments", 2)) != model_key(base, ("segments", 2)), change


def test_models_with_equal_weights_and_another_eps_do_not_share_a_graph(armt_cache):
    for eps in (1e-6, 0.3):
        model = small_armt(norm_eps=eps)
        _same_as_torch(wavefront.optimize(model, backend="onnxruntime"), model, IDS, f"eps {eps}")


def test_segment_model_weights_replaced_or_changed_after_the_first_call_are_seen(armt_cache):
    model = small_armt()
    fast = wavefront.optimize(model, backend="onnxruntime")
    _same_as_torch(fast, model, IDS, "first call")
    model.load_state_dict(small_armt(seed=3).state_dict(), assign=True)
    _same_as_torch(fast, model, IDS, "after load_state_dict(assign=True)")
    with torch.no_grad():  # stacked layer weights, after the assign replaced them
        model.cell.layers[1].block.mlp_norm.weight.mul_(1.5)
    _same_as_torch(fast, model, IDS, "after an in-place change")
    exports = fast.exports
    _same_as_torch(fast, model, IDS, "unchanged")
    assert fast.exports == exports  # no change, no export


def test_loop_model_weights_changed_after_the_first_call_are_seen(cache):
    torch.manual_seed(0)
    model = LinearRecurrence(5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fast = wavefront.optimize(model, backend="onnxruntime")
    x = torch.randn(2, 9, 5)

    def check(what, exports):
        with torch.no_grad():
            assert_close(fast(x), model(x), 1e-4, what)
        assert fast.exports == exports, what
    check("first call", 1)
    with torch.no_grad():
        model.proj.weight.mul_(2)
    check("in place", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    check("an SGD step", 3)
    model.load_state_dict(original)
    check("load_state_dict back to the first weights: their graph, from the disk cache", 3)
    model.load_state_dict(LinearRecurrence(5).state_dict(), assign=True)
    check("load_state_dict(assign=True)", 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data.copy_(original[name])  # bypasses the version counter: refresh() says so
    fast.refresh()
    check("writes through .data, then refresh()", 4)


class ScaledRecurrence(nn.Module):
    """A loop model with a non-tensor argument: the graph holds `scale` as a constant."""

    def __init__(self, d):
        super().__init__()
        self.gate, self.proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, scale):
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
        out = torch.zeros_like(x)
        for t in range(x.shape[1]):
            a = torch.sigmoid(self.gate(x[:, t]))
            h = a * h + (1 - a) * self.proj(x[:, t]) * scale
            out[:, t] = h
        return out


def test_non_tensor_arguments_are_part_of_the_key(cache):
    torch.manual_seed(0)
    model = ScaledRecurrence(4).eval()
    fast = wavefront.optimize(model, backend="onnxruntime")
    x = torch.randn(2, 9, 4)
    with torch.no_grad():
        for scale in (1.0, 3.0, 1.0):
            assert_close(fast(x, scale), model(x, scale), 1e-4, f"scale={scale}")
    assert fast.exports == 2
    with pytest.raises(TypeError, match="argument 1 is a dict: backend='onnxruntime' takes tensors and plain values"):
        fast(x, {"scale": 1.0})


def _torch_error(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_bad_input_is_refused_like_torch_before_onnxruntime(armt_cache):
    model = small_armt()
    fast = wavefront.optimize(model, backend="onnxruntime")
    ref_backend = wavefront.optimize(small_armt())  # the torch backend, on a copy of the model
    for bad, value in (("negative", -3), ("out of vocabulary", VOCAB)):
        ids = IDS.clone()
        ids[1, 4] = value
        with pytest.raises(IndexError, match="index out of range"):
            model(ids)
        with pytest.raises(IndexError, match=rf"index out of range.*\[0, {VOCAB}\).*{value}"):
            fast(ids)
    first, ref_first = _same_as_torch(fast, model, IDS, "first call")
    other = torch.zeros(1, 2 * SEG, dtype=torch.long)
    one_row = ref_backend(other).memory
    wrong = [first.memory.tensors,  # not a MemoryState
             one_row,  # batch 1 for a batch of 2
             type(first.memory)(tuple(t.double() for t in first.memory.tensors), first.memory.segments_seen),
             type(first.memory)(first.memory.tensors[:-1], first.memory.segments_seen)]
    for memory in wrong:
        expected = _torch_error(lambda: ref_backend(IDS, memory))
        with pytest.raises(type(expected), match=re.escape(str(expected))):
            fast(IDS, memory)
    with torch.no_grad():  # the refused calls changed nothing: the stream goes on from the first call's memory
        out, ref = fast(IDS.int(), first.memory), model(IDS, ref_first.memory)
    assert_close(out.logits, ref.logits, 1e-4, "after the refused calls, int32 ids")


def test_four_threads_making_the_first_call_share_one_export(cache):
    torch.manual_seed(0)
    model = LinearRecurrence(5).eval()
    fast = wavefront.optimize(model, backend="onnxruntime")
    xs = [torch.randn(2, 9, 5) for _ in range(4)]
    barrier, results, errors = threading.Barrier(4), {}, []

    def call(i):
        barrier.wait()
        try:
            with torch.no_grad():
                results[i] = fast(xs[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with torch.no_grad():
        for i, x in enumerate(xs):
            assert_close(results[i], model(x), 1e-4, f"thread {i}")
    assert fast.exports == 1 and len(list(cache.glob("onnx/*.onnx"))) == 1


def test_three_processes_exporting_one_key_into_one_cache_all_succeed(cache):
    script = ("import torch, wavefront\n"
              "from wavefront.models import LinearRecurrence\n"
              "torch.manual_seed(0)\n"
              "model = LinearRecurrence(5).eval()\n"
              "fast = wavefront.optimize(model, backend='onnxruntime')\n"
              "x = torch.randn(2, 9, 5)\n"
              "with torch.no_grad():\n"
              "    err = ((fast(x) - model(x)).abs().max() / model(x).abs().max()).item()\n"
              "print(fast.export_time_s is not None, err)\n")  # exported here, or found in the cache
    env = {**os.environ, "WAVEFRONT_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    exported, errs = zip(*(out.split() for _, out, _ in results))
    assert sorted(exported) == ["False", "False", "True"] and max(float(e) for e in errs) < 1e-4
    assert len(list(cache.glob("onnx/*.onnx"))) == 1


def test_a_truncated_onnx_entry_is_exported_again_with_a_warning(cache):
    torch.manual_seed(0)
    model = LinearRecurrence(5).eval()
    x = torch.randn(2, 9, 5)
    with torch.no_grad():
        wavefront.optimize(model, backend="onnxruntime")(x)
        (entry,) = cache.glob("onnx/*.onnx")
        os.truncate(entry, entry.stat().st_size // 2)
        again = wavefront.optimize(model, backend="onnxruntime")
        with pytest.warns(CacheWarning, match="truncated or changed"):
            assert_close(again(x), model(x), 1e-4, "after the truncated entry")
    assert again.exports == 1


def test_an_exported_segment_graph_checks_its_inputs_like_torch(armt_cache):
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model = small_armt()
    fast = wavefront.optimize(model, backend="onnxruntime")
    fast(IDS)  # the base model's graph (the module's cache), opened as the backend opens it
    session, ids = fast.last_session, IDS
    assert isinstance(session, OnnxSegmentSession)
    bad = ids.clone()
    bad[0, 2] = -3
    with pytest.raises(IndexError, match=rf"index out of range.*\[0, {VOCAB}\)"):
        session(bad)
    first = session(ids)
    ref_backend = wavefront.optimize(small_armt())
    one_row = ref_backend(ids[:1]).memory
    expected = _torch_error(lambda: ref_backend(ids, one_row))
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        session(ids, one_row)
    with torch.no_grad():
        ref_first = model(ids)
        out, ref = session(ids.int(), first.memory), model(ids, ref_first.memory)
    assert_close(out.logits, ref.logits, 1e-4, "exported graph, int32 ids, after the refused calls")


def test_a_setting_changed_after_the_first_call_is_seen(armt_cache):
    """Not a tensor: eps, baked into the exported graph, must key the session too."""
    model = small_armt()
    fast = wavefront.optimize(model, backend="onnxruntime")
    _same_as_torch(fast, model, IDS, "first call")
    for layer in model.cell.layers:
        layer.block.attn_norm.eps = 0.5
    _same_as_torch(fast, model, IDS, "after changing eps")
