"""MASS on a generative transformers model (a tiny random Llama): two-pass routing decided
once per prompt and kept for every generated token (KV cache, beams), against each
expert's own generate; KV caches and direct calls that would silently route otherwise
are refused."""
import copy

import pytest
import torch

from mass_ext import MASS, Routing

transformers = pytest.importorskip("transformers")

VOCAB, T = 40, 2


@pytest.fixture(scope="module")
def llama_experts():
    """A base Llama and T experts whose Linear deltas have rank 2 (below every layer's
    default rank), so MASS routed to task t reproduces expert t to float tolerance."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=None)  # no early stop: fixed lengths
    base = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    experts = {}
    for t in range(T):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for name, module in expert.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    d_out, d_in = module.weight.shape
                    module.weight += 0.3 * (torch.randn(d_out, 2, generator=g)
                                            @ torch.randn(2, d_in, generator=g)) / d_in ** 0.5
        experts[f"task{t}"] = expert
    mm = MASS.from_finetuned(base, experts, router_layer="model.layers.1.mlp.down_proj",
                             pooling="mean", progress=False)
    return mm, list(experts.values())


def _prompts(seed=2, batch=4, length=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=2)], ids=["greedy", "beams"])
def test_generate_keeps_each_prompts_routing_and_matches_its_expert(llama_experts, options):
    mm, experts = llama_experts
    prompts = _prompts()
    settings = dict(max_new_tokens=4, do_sample=False, **options)
    with torch.no_grad():
        out = mm.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
        routing = mm.routing
        assert torch.equal(routing.indices, mm.route(input_ids=prompts).indices)
        # The same prompts with the other task forced: each sample gets its own decision.
        flipped = Routing(1 - routing.indices, routing.weights, None)
        with mm.applying(flipped, repeat_samples=True):
            out_flipped = mm.model.generate(prompts, **settings)
        for i, prompt in enumerate(prompts):
            for generated, t in ((out, routing.indices[i, 0]), (out_flipped, 1 - routing.indices[i, 0])):
                expected = experts[t].generate(prompt[None], **settings)
                assert torch.equal(generated[i], expected[0]), (i, int(t))


def test_own_decoding_loop_with_a_kv_cache_through_run(llama_experts):
    mm, _ = llama_experts
    prompts = _prompts(seed=3)
    with torch.no_grad():
        routing = mm.route(input_ids=prompts)
        whole = mm.run(routing, input_ids=prompts).logits
        first = mm.run(routing, input_ids=prompts[:, :-1], use_cache=True)
        step = mm.run(routing, input_ids=prompts[:, -1:], past_key_values=first.past_key_values,
                      use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], whole[:, -1], atol=1e-5, rtol=1e-5)


def test_two_pass_refuses_a_kv_cache_and_direct_calls(llama_experts):
    mm, _ = llama_experts
    prompts = _prompts(seed=4)
    with torch.no_grad():
        cache = mm(input_ids=prompts, use_cache=True).past_key_values
        length = cache.get_seq_length()
        with pytest.raises(ValueError, match=r"cannot take a KV cache \(past_key_values=\.\.\.\)"):
            mm(input_ids=prompts[:, :1], past_key_values=cache)
        assert cache.get_seq_length() == length   # untouched
        with pytest.raises(RuntimeError, match="belongs to a two-pass MASS model"):
            mm.model.generate(prompts, max_new_tokens=2, do_sample=False)
        mm.mode = "per_layer"   # every row routes itself: direct calls are per-layer MASS
        try:
            assert mm.model(input_ids=prompts).logits.shape == (4, 5, VOCAB)
            assert mm.generate(prompts, max_new_tokens=2, do_sample=False).shape == (4, 7)
        finally:
            mm.mode = "two_pass"
