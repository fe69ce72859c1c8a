"""Memory-loss training in ``examples/train_tiny_lm.py`` (the paper's recipe: LM loss + eps *
mean over layers of max_i M / N, tau = 1) does what it is for: the trained model needs less
memory M than the same model trained without it, from the same seed and data order."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from tiny_lm import TinyLMConfig, windows  # noqa: E402
from train_tiny_lm import memory_term, train  # noqa: E402

CONTEXT = 64


@pytest.fixture(scope="module")
def data():
    # Bytes with some structure (repeated words), so the LM loss has something to learn.
    g = torch.Generator().manual_seed(0)
    words = [bytes(torch.randint(97, 123, (int(n),), generator=g).tolist())
             for n in torch.randint(2, 8, (40,), generator=g)]
    order = torch.randint(0, len(words), (6000,), generator=g).tolist()
    text = b" ".join(words[i] for i in order)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


@torch.no_grad()
def mean_memory(model, data):
    starts = torch.arange(0, 8 * 97, 97)
    inputs, _ = windows(data, CONTEXT, starts)
    model.eval()
    model(inputs)
    return memory_term(model).item() * CONTEXT  # tokens


def test_memory_loss_lowers_memory(data):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TinyLMConfig(dim=32, layers=2, heads=2, context=CONTEXT, memory_tau=1.0)
        plain = train(cfg, 40, 4, 3e-3, 0, data, progress=False, log_every=10 ** 6)
        memloss = train(cfg, 40, 4, 3e-3, 0, data, progress=False, log_every=10 ** 6,
                        memloss_eps=1.0)
        m_plain, m_memloss = mean_memory(plain, data), mean_memory(memloss, data)
    finally:
        torch.set_num_threads(saved)
    print(f"max_i M: plain {m_plain:.2f}, memory loss {m_memloss:.2f} tokens of {CONTEXT}")
    assert 0 < m_memloss < 0.8 * m_plain, (m_plain, m_memloss)


def test_memloss_needs_memory_tau(data):
    with pytest.raises(ValueError, match="memory_tau"):
        train(TinyLMConfig(dim=16, layers=1, heads=2, context=CONTEXT), 1, 2, 1e-3, 0, data,
              progress=False, memloss_eps=0.1)
