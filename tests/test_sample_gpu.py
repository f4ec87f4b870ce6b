"""The CUDA-graph decoding step on a GPU (run: pytest -m gpu tests/test_sample_gpu.py): replaying the captured
one-token step gives the logits and state of the eager step, for RWKV models and for hybrids without attention
layers; a hybrid with attention layers is refused."""
import pytest
import torch
import transformers

from helpers import random_model, rel_err
from model import Hybrid
from sample import expand_state, generate, graphed_step, prefill, state_tensors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")]


def tiny_hybrid(rwkv_layers):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return Hybrid(transformers.LlamaForCausalLM(cfg), rwkv_layers).eval().cuda()


def check_graph_equals_eager(model, batch=4, steps=12):
    _, state = prefill(model, [5, 17, 200, 2, 9])
    state = expand_state(state, batch)
    step = graphed_step(model, state)
    gen = torch.Generator(device="cuda").manual_seed(0)
    eager_state = state
    for _ in range(steps):
        tokens = torch.randint(0, 300, (batch,), device="cuda", generator=gen)
        with torch.no_grad():
            ref_logits, _, eager_state = model(tokens[:, None], state=eager_state)
        logits, graph_state = step(tokens)
        assert rel_err(logits, ref_logits[:, -1].float()) < 1e-5
    for a, b in zip(state_tensors(graph_state), state_tensors(eager_state)):
        assert rel_err(a, b) < 1e-5
    assert not any(t.isnan().any() for t in state_tensors(graph_state))


def test_graphed_step_rwkv():
    check_graph_equals_eager(random_model(n_layer=2, n_embd=128, vocab_size=300).cuda())


def test_graphed_step_all_rwkv_hybrid():
    check_graph_equals_eager(tiny_hybrid("all"))


def test_graphed_step_refuses_attention_layers():
    model = tiny_hybrid([0, 1])
    _, state = prefill(model, [5, 17])
    with pytest.raises(ValueError, match="fixed-size state"):
        graphed_step(model, state)


@pytest.mark.parametrize("hybrid", [False, True])
def test_generate_with_graph_equals_eager(hybrid):
    """sample.generate(cuda_graph=True): the same greedy ids as eager decoding, and a final state of the model's own
    kind (a HybridState for hybrids: GRPO's rollouts crashed on this once) equal to the eager one."""
    model = tiny_hybrid("all") if hybrid else random_model(n_layer=2, n_embd=128, vocab_size=300).cuda()
    logits, state = prefill(model, [5, 17, 200, 2, 9])
    runs = [generate(model, logits.expand(3, -1), expand_state(state, 3), 16, [None] * 3, temperature=0,
                     cuda_graph=graph) for graph in (False, True)]
    (eager_ids, eager_state), (graph_ids, graph_state) = runs
    assert graph_ids == eager_ids and type(graph_state) is type(eager_state)
    for a, b in zip(state_tensors(graph_state), state_tensors(eager_state)):
        assert rel_err(a, b) < 1e-5
