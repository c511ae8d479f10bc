"""One optimized model serves several threads at once with the sequential results."""
import threading

import pytest
import torch

import wavefront
from conftest import ARMT_KINDS, SEG, VOCAB, build


def _hammer(fast, inputs, expected, n_threads=4, rounds=6):
    """Every thread runs every input `rounds` times, in its own order; returns the failures."""
    failures, start = [], threading.Barrier(n_threads)

    def work(k):
        start.wait()
        for r in range(rounds):
            for i in range(len(inputs)):
                j = (i + k + r) % len(inputs)
                try:
                    with torch.no_grad():
                        got = fast(inputs[j]).logits
                    if not torch.allclose(got, expected[j], rtol=0, atol=1e-10):
                        failures.append(f"thread {k}, input {j}: max diff {(got - expected[j]).abs().max():.2e}")
                except Exception as e:  # noqa: BLE001 (reported, not swallowed)
                    failures.append(f"thread {k}, input {j}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return failures


@pytest.mark.parametrize("kind", ARMT_KINDS)
def test_four_threads_get_the_sequential_results(kind):
    model = build(kind)
    g = torch.Generator().manual_seed(0)
    # whole segments (the one-program path) and a short last segment (step by step), batch 1 and 2
    inputs = [torch.randint(0, VOCAB, (b, n), generator=g) for b, n in ((1, 4 * SEG), (2, 5 * SEG - 2),
                                                                       (2, 3 * SEG), (1, 6 * SEG - 1))]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    fast = wavefront.optimize(model)
    failures = _hammer(fast, inputs, expected)
    assert not failures, f"{len(failures)} bad calls, e.g. {failures[:3]}"


@pytest.mark.hf
def test_four_threads_on_a_vmap_batched_kind():
    model = build("llama")
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, VOCAB, (2, n), generator=g) for n in (4 * SEG, 3 * SEG - 1)]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    fast = wavefront.optimize(model)
    fast.batched.groups[0].cell.fallback_reason = "forced for this test"  # torch.func.vmap batches the layers
    failures = _hammer(fast, inputs, expected, rounds=3)
    assert not failures, f"{len(failures)} bad calls, e.g. {failures[:3]}"


@pytest.mark.hf
def test_threads_get_the_sequential_results_while_the_model_is_captured_again():
    """A change of the model makes the next call capture it again (for the public ARMT code: the
    proof swaps its memory weights for random ones, restacks the parameters): calls in flight and
    calls during it must never see that."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_published_adapter import published
    model = published("llama")
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randint(0, VOCAB, (2, n), generator=g) for n in (4 * SEG, 3 * SEG - 1)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    fast = wavefront.optimize(model)
    stop, failures = threading.Event(), []

    def changes():
        k = 0
        while not stop.is_set():
            model.rmt_config["note"] = k  # a setting the guard watches: the next call captures again
            k += 1
            stop.wait(0.02)

    changer = threading.Thread(target=changes)
    changer.start()
    try:
        failures = _hammer(fast, inputs, expected, n_threads=3, rounds=6)
    finally:
        stop.set()
        changer.join()
    assert "rmt_config" in fast.refreshed
    assert not failures, f"{len(failures)} bad calls, e.g. {failures[:3]}"
