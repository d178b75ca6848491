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


def _fine_tuned(base, changes_layer):
    """T copies of `base`. With changes_layer(name, module), each such layer's weight moves
    by a rank-2 delta (below every default rank: MASS routed to task t reproduces expert
    t); with None, every parameter moves by small noise."""
    g = torch.Generator().manual_seed(1)
    experts = {}
    for t in range(T):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for name, module in expert.named_modules():
                if changes_layer is not None and changes_layer(name, module):
                    a, b = module.weight.shape
                    module.weight += 0.3 * (torch.randn(a, 2, generator=g)
                                            @ torch.randn(2, b, generator=g)) / b ** 0.5
            if changes_layer is None:
                for p in expert.parameters():
                    p += 0.05 * torch.randn(p.shape, generator=g)
        experts[f"task{t}"] = expert
    return experts


@pytest.fixture(scope="module")
def llama_experts():
    """A base Llama and T experts whose Linear deltas have rank 2."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=None)  # no early stop: fixed lengths
    base = transformers.LlamaForCausalLM(config).eval()
    experts = _fine_tuned(base, lambda name, module: isinstance(module, torch.nn.Linear)
                          and name != "lm_head")
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
        step = mm.run(routing, input_ids=prompts[:, -1:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], whole[:, -1], atol=1e-5, rtol=1e-5)


def test_per_layer_mode_pools_the_current_tokens_of_a_mask_that_covers_the_cache(llama_experts):
    """With a KV cache the attention_mask covers past and new tokens: per-layer mode's
    routing (the router layer's pooled input) pools the new tokens, its last columns."""
    mm, _ = llama_experts
    per_layer = MASS(mm.model, mm.task_names, router_layer=mm.router_layer, pooling="mean",
                     mode="per_layer")
    prompts = _prompts(seed=15)
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        cache = per_layer(input_ids=prompts, attention_mask=mask, use_cache=True).cache
        step = prompts[:, :1]
        per_layer(input_ids=step, attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
        assert per_layer.routing.indices.shape == (4, 1)
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, >= L\) = \(4, >= 5\)"):
            per_layer(input_ids=prompts, attention_mask=mask[:, :3])


def test_two_pass_refuses_a_kv_cache_and_direct_calls(llama_experts):
    mm, _ = llama_experts
    prompts = _prompts(seed=4)
    with torch.no_grad():
        cache = mm(input_ids=prompts, use_cache=True).cache
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
            assert mm.routing is None   # no per-sample decision in per-layer generation
        finally:
            mm.mode = "two_pass"


# ------------------------------------------------------------------ GPT-2: Conv1D layers

@pytest.fixture(scope="module")
def gpt2_experts():
    """GPT-2's layers are transformers' Conv1D (y = x W + b, W stored (d_in, d_out)), its
    positions absolute; expert deltas of rank 2 on every Conv1D weight."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    base = transformers.GPT2LMHeadModel(config).eval()
    experts = _fine_tuned(base, lambda name, module: type(module).__name__ == "Conv1D")
    mm = MASS.from_finetuned(base, experts, router_layer="transformer.h.1.mlp.c_proj",
                             pooling="mean", progress=False)
    return base, mm, list(experts.values())


def test_gpt2_conv1d_layers_are_routed_and_reproduce_each_expert(gpt2_experts, tmp_path):
    base, mm, experts = gpt2_experts
    assert len(mm.routed) == 8   # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    prompts = _prompts(seed=5)
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        for t, expert in enumerate(experts):
            known = Routing(torch.full((4, 1), t), torch.ones(4, 1), None)
            torch.testing.assert_close(mm.run(known, input_ids=prompts).logits,
                                       expert(input_ids=prompts).logits, atol=1e-4, rtol=1e-4)
        out = mm.generate(prompts, **settings)
        for i, t in enumerate(mm.routing.indices[:, 0].tolist()):
            assert torch.equal(out[i], experts[t].generate(prompts[i:i + 1], **settings)[0])
        mm.save(tmp_path / "gpt2.safetensors")
        skeleton = transformers.GPT2LMHeadModel(base.config)
        loaded = MASS.load(tmp_path / "gpt2.safetensors", skeleton)
        assert not loaded.training and not loaded.model.training
        assert torch.equal(loaded(input_ids=prompts).logits, mm(input_ids=prompts).logits)


def test_left_padded_prompts_route_and_generate_as_alone(gpt2_experts):
    """Pass 1 gets generate's position ids (GPT-2's are absolute) and the mask inferred
    from the pad token, so padding changes neither the routing nor the tokens."""
    _, mm, experts = gpt2_experts
    prompts = _prompts(seed=6, batch=6, length=5)
    padded = torch.cat([torch.zeros(6, 3, dtype=torch.long), prompts], 1)
    padded[::2, :3] = prompts[::2, :3]          # half of them longer instead of padded
    mask = (padded != 0).long()
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        out = mm.generate(padded, **settings)   # no mask: inferred from pad_token_id 0
        routing = mm.routing
        for i in range(6):
            alone = padded[i:i + 1, mask[i].bool()]
            mm.generate(alone, **settings)
            assert torch.equal(mm.routing.indices[0], routing.indices[i])
            expected = experts[routing.indices[i, 0]].generate(
                padded[i:i + 1], attention_mask=mask[i:i + 1], **settings)
            assert torch.equal(out[i], expected[0])
        with pytest.warns(UserWarning, match="pooling='cls' routes each sample on its first "
                                             "token, which in a decoder-only model"):
            cls = MASS(mm.model, mm.task_names, router_layer=mm.router_layer, pooling="cls")
        with pytest.raises(ValueError, match="pooling='cls' pools the first token"):
            cls.generate(padded, attention_mask=mask, **settings)


def test_kv_cache_given_by_position_is_refused_too(llama_experts):
    mm, _ = llama_experts
    prompts = _prompts(seed=7)
    with torch.no_grad():
        cache = mm(input_ids=prompts, use_cache=True).cache
        with pytest.raises(ValueError, match=r"cannot take a KV cache \(cache=\.\.\.\)"):
            mm(prompts[:, :1], None, None, cache)
        assert cache.get_seq_length() == 5


def test_bert_mlm_output_layer_stays_routed_after_tie_weights():
    """BertForMaskedLM ties its decoder to the word embeddings: MASS averages the
    embeddings and routes the decoder from its base weight, so tie_weights() must not
    re-tie them (MASS turns the config's tie_word_embeddings off)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=37)
    base = transformers.BertForMaskedLM(config).eval()
    experts = _fine_tuned(base, None)
    mm = MASS.from_finetuned(base, experts, router_layer="cls.predictions.transform.dense",
                             pooling="mean", progress=False)
    assert "cls.predictions.decoder" in mm.routed
    prompts = _prompts(seed=8)
    with torch.no_grad():
        before = mm(input_ids=prompts).logits
        mm.model.tie_weights()
        assert torch.equal(mm(input_ids=prompts).logits, before)


def test_build_from_save_pretrained_files_with_tied_keys_left_out(gpt2_experts, tmp_path):
    """save_pretrained stores a tied tensor once (GPT-2's lm_head.weight is the token
    embedding): the left-out key reads as its partner, in one file or in shards."""
    from safetensors import safe_open

    base, mm, experts = gpt2_experts
    paths = {}
    for t, expert in enumerate(experts):
        expert.save_pretrained(tmp_path / f"task{t}")
        paths[f"task{t}"] = tmp_path / f"task{t}" / "model.safetensors"
    with safe_open(paths["task0"], framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    from_files = MASS.from_finetuned(base, paths, router_layer="transformer.h.1.mlp.c_proj",
                                     pooling="mean", progress=False)
    # Sharded as transformers shards large models: the folder holds the index.
    experts[0].save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    from_shards = MASS.from_finetuned(base, {**paths, "task0": tmp_path / "sharded"},
                                      router_layer="transformer.h.1.mlp.c_proj",
                                      pooling="mean", progress=False)
    prompts = _prompts(seed=9)
    with torch.no_grad():
        assert torch.equal(from_files(input_ids=prompts).logits, mm(input_ids=prompts).logits)
        assert torch.equal(from_shards(input_ids=prompts).logits, mm(input_ids=prompts).logits)


def test_generate_infers_the_mask_as_transformers_does(llama_experts):
    """The pad token masks padding, unless it is also the end-of-sequence token: then it
    is text and transformers infers no mask, nor does pass 1."""
    mm, _ = llama_experts
    prompts = _prompts(seed=10)
    prompts[:, :2] = 0                                    # pad_token_id 0 at the front
    settings = dict(max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        mm.generate(prompts, **settings)
        masked = mm.routing.residuals
        mm.route(input_ids=prompts, attention_mask=(prompts != 0).long(),
                 position_ids=(torch.arange(5) - 2).clamp(min=0).expand(4, 5))
        torch.testing.assert_close(masked, mm.routing.residuals)
        mm.generate(prompts, eos_token_id=0, **settings)  # pad == eos: no mask
        unmasked = mm.route(input_ids=prompts).residuals
        torch.testing.assert_close(mm.routing.residuals, unmasked)
        assert not torch.allclose(masked, unmasked)


def test_positional_attention_mask_pools_like_the_keyword_one(llama_experts):
    mm, _ = llama_experts
    prompts = _prompts(seed=11)
    mask = torch.ones_like(prompts)
    mask[:, :2] = 0
    with torch.no_grad():
        by_name = mm.route(input_ids=prompts, attention_mask=mask).residuals
        by_position = mm.route(prompts, mask).residuals
        unmasked = mm.route(prompts).residuals
    assert torch.equal(by_position, by_name) and not torch.allclose(by_name, unmasked)


def test_cli_builds_from_task_checkpoints_with_tied_keys_and_names_missing_ones(tmp_path, capsys):
    """A BART generation checkpoint (keys under "model.", the shared embeddings stored
    once) builds against a BartModel base folder; a BERT masked-LM checkpoint (no pooler)
    against a BertModel base is refused, naming the pooler."""
    import mass_ext.cli

    torch.manual_seed(0)
    bart = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1,
                                   decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=16,
                                   decoder_ffn_dim=16, max_position_embeddings=32)
    base = transformers.BartModel(bart).eval()
    base.save_pretrained(tmp_path / "base")
    args = ["build", "--base", str(tmp_path / "base"), "--pooling", "mean",
            "--router-layer", "encoder.layers.0.fc1", "-o", str(tmp_path / "bart.safetensors")]
    for t in range(T):
        task = transformers.BartForConditionalGeneration(bart)
        task.model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for module in task.model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight += 0.05 * torch.randn(module.weight.shape)
        task.save_pretrained(tmp_path / f"task{t}")
        args += ["--task", f"task{t}={tmp_path / f'task{t}'}"]
    mass_ext.cli.main(args)
    assert "tasks       2: task0, task1" in capsys.readouterr().out

    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16)
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    transformers.BertForMaskedLM(bert).save_pretrained(tmp_path / "mlm")
    with pytest.raises(SystemExit):
        mass_ext.cli.main(["build", "--base", str(tmp_path / "bert"), "--router-layer",
                           "encoder.layer.0.output.dense", "--task", f"a={tmp_path / 'mlm'}",
                           "-o", str(tmp_path / "bert.safetensors")])
    assert "missing 2 keys ['pooler.dense.bias', 'pooler.dense.weight']" in capsys.readouterr().err


def test_cli_builds_a_causal_lm_from_folders_with_its_head(llama_experts, tmp_path, capsys):
    """--base-class AutoModelForCausalLM loads the base folder with its LM head (AutoModel
    would drop it and the layer names' "model." prefix): the bundle loads onto a causal-LM
    skeleton and generates as the experts do; an unknown class is a clear error."""
    import mass_ext.cli

    mm, experts = llama_experts
    base = transformers.LlamaForCausalLM(experts[0].config).eval()
    base.load_state_dict({k: v for k, v in mm.model.state_dict().items() if k in base.state_dict()},
                         strict=False)
    for name, module in mm.routed.items():   # the base's own weights, not MASS's
        base.get_submodule(name).weight.data.copy_(module.weight)
    base.save_pretrained(tmp_path / "base")
    args = ["build", "--base", str(tmp_path / "base"), "--base-class", "AutoModelForCausalLM",
            "--pooling", "mean", "--router-layer", "model.layers.1.mlp.down_proj",
            "-o", str(tmp_path / "lm.safetensors")]
    for t, expert in enumerate(experts):
        expert.save_pretrained(tmp_path / f"task{t}")
        args += ["--task", f"task{t}={tmp_path / f'task{t}'}"]
    mass_ext.cli.main(args)
    loaded = MASS.load(tmp_path / "lm.safetensors",
                       transformers.AutoModelForCausalLM.from_config(experts[0].config))
    prompts = _prompts(seed=21)
    with torch.no_grad():
        out = loaded.generate(prompts, max_new_tokens=3, do_sample=False)
        for i, t in enumerate(loaded.routing.indices[:, 0].tolist()):
            expected = experts[t].generate(prompts[i:i + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(out[i], expected[0])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mass_ext.cli.main(["AutoNothing" if a == "AutoModelForCausalLM" else a for a in args])
    assert "--base-class must name a transformers model class" in capsys.readouterr().err


# ---------------------------------------------------------------- encoder-decoder models

def _bart(router_layer, pooling):
    """A tiny BART generation model (pad 1, eos 2) and T experts with rank-2 Linear
    deltas (lm_head, tied to the embeddings, unchanged), as MASS."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_position_embeddings=32)
    base = transformers.BartForConditionalGeneration(config).eval()
    experts = _fine_tuned(base, lambda name, module: isinstance(module, torch.nn.Linear)
                          and name != "lm_head")
    mm = MASS.from_finetuned(base, experts, router_layer=router_layer, pooling=pooling,
                             progress=False)
    return mm, list(experts.values())


def _right_padded(seed, batch=4, length=6):
    prompts = _prompts(seed=seed, batch=batch, length=length)    # tokens >= 2: no pad (1)
    mask = torch.ones_like(prompts)
    for i in range(1, batch):
        mask[i, length - i:] = 0
    return prompts.masked_fill(mask == 0, 1), mask


def test_encoder_decoder_routers_are_in_the_encoder_unless_a_callable_pools():
    """attention_mask describes the encoder's tokens: with the built-in poolings, a router
    layer on the decoder's side (its layers, cross-attention keys and values reading the
    encoder's states) is refused when the wrapper is made; a pooling callable may route
    on it, with the forward's decoder_attention_mask, but not in generate, which routes
    before the decoder has seen any token."""
    mm, _ = _bart("model.encoder.layers.0.fc1", "mean")
    for router in ("model.decoder.layers.0.fc1", "model.decoder.layers.0.encoder_attn.k_proj"):
        with pytest.raises(ValueError, match=rf"router_layer \['{router}'\] is outside the "
                                             "encoder of this encoder-decoder model"):
            MASS(mm.model, mm.task_names, router_layer=router, pooling="mean")
    router = "model.decoder.layers.0.fc1"
    seen = []

    def decoder_mean(x, kwargs):
        seen.append(x.shape)
        mask = kwargs["decoder_attention_mask"][..., None].to(x.dtype)
        return (x * mask).sum(1) / mask.sum(1)

    custom = MASS(mm.model, mm.task_names, router_layer=router, pooling=decoder_mean)
    prompts, mask = _right_padded(seed=12, length=8)
    decoder = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(4))
    decoder_mask = torch.ones_like(decoder)
    decoder_mask[:, 4:] = 0
    with torch.no_grad():
        routing = custom.route(input_ids=prompts, attention_mask=mask, decoder_input_ids=decoder,
                               decoder_attention_mask=decoder_mask)
        assert routing.indices.shape == (4, 1) and seen == [(4, 6, 16)]
        with pytest.raises(ValueError, match=r"router layer\(s\) \['model.decoder.layers.0.fc1'\] "
                                             "are outside the encoder"):
            custom.generate(prompts, attention_mask=mask, max_new_tokens=2)


def test_generate_with_cls_pooling_takes_right_padded_encoder_prompts():
    """'cls' pools the first token: right padding leaves it a real token, so generate
    routes such prompts (only left padding is refused), and every prompt's tokens are its
    routed expert's."""
    mm, experts = _bart("model.encoder.layers.0.fc1", "cls")
    prompts, mask = _right_padded(seed=13)
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        out = mm.generate(prompts, attention_mask=mask, **settings)
        tasks = mm.routing.indices[:, 0]
        assert torch.equal(tasks, mm.route(input_ids=prompts, attention_mask=mask).indices[:, 0])
        for i in range(len(prompts)):
            expected = experts[tasks[i]].generate(prompts[i:i + 1], attention_mask=mask[i:i + 1],
                                                  **settings)
            assert torch.equal(out[i, :expected.shape[1]], expected[0]), i
        left = mask.flip(1)                                   # padding in front
        with pytest.raises(ValueError, match="padding in a left-padded prompt"):
            mm.generate(prompts, attention_mask=left, **settings)


def test_generate_takes_the_models_main_input_whisper_features():
    """generate's prompts are the model's main input (Whisper: input_features), given
    by position or by name; pass 1 routes them in the encoder."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_source_positions=8, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    base = transformers.WhisperForConditionalGeneration(config).eval()
    experts = list(_fine_tuned(base, lambda name, module: isinstance(module, torch.nn.Linear)
                               and name != "proj_out").values())
    mm = MASS.from_finetuned(base, dict(zip(("a", "b"), experts)), pooling="mean",
                             router_layer="model.encoder.layers.0.fc1", progress=False)
    features = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        out = mm.generate(features, **settings)
        tasks = mm.routing.indices[:, 0]
        assert torch.equal(mm.generate(input_features=features, **settings), out)
        for i in range(3):
            expected = experts[tasks[i]].generate(input_features=features[i:i + 1], **settings)
            assert torch.equal(out[i], expected[0]), i
        with pytest.raises(ValueError, match=r"generate needs the prompts as a tensor: inputs "
                                             r"or input_features=\.\.\., got NoneType"):
            mm.generate(**settings)


def test_opt_whose_mlp_sees_the_tokens_flattened_routes_and_generates_per_prompt():
    """OPT's fc1/fc2 see the batch as (B * L, d): each row takes its prompt's decision, in
    a forward pass and in generate (prefill and every decoding step)."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
        pad_token_id=1, bos_token_id=2, eos_token_id=None)
    base = transformers.OPTForCausalLM(config).eval()
    experts = list(_fine_tuned(base, lambda name, module: isinstance(module, torch.nn.Linear)
                               and name != "lm_head").values())
    mm = MASS.from_finetuned(base, dict(zip(("a", "b"), experts)), pooling="mean",
                             router_layer="model.decoder.layers.0.fc2", progress=False)
    prompts = _prompts(seed=14)
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        logits = mm(input_ids=prompts).logits
        tasks = mm.routing.indices[:, 0]
        out = mm.generate(prompts, **settings)
        assert torch.equal(mm.routing.indices[:, 0], tasks)
        for i in range(len(prompts)):
            expert = experts[tasks[i]]
            torch.testing.assert_close(logits[i], expert(input_ids=prompts[i:i + 1]).logits[0],
                                       atol=1e-5, rtol=1e-5)
            assert torch.equal(out[i], expert.generate(prompts[i:i + 1], **settings)[0]), i


@pytest.mark.parametrize("options", [dict(), dict(num_beams=2)], ids=["greedy", "beams"])
def test_generate_with_the_merged_weight_cache(llama_experts, options):
    """generate with the merged-weight cache on (prompts' rows repeated for beams, the KV
    cache's one-token steps): the tokens and logits of generate without it."""
    mm, _ = llama_experts
    mm = copy.deepcopy(mm)
    prompts = _prompts(seed=4)
    settings = dict(max_new_tokens=4, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, **options)
    with torch.no_grad():
        plain = mm.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
        mm.cache_merged_weights(T)
        cached = mm.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    assert mm.merged_cache_bytes > 0
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
