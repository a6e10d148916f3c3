import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, VOCAB, plan_for, tiny_model
from llmprune import calibrate
import llmprune.calibrate.loop  # noqa: F401  (calibrate.loop below)
from llmprune.calibrate.cache import ActivationCache, run_block
from llmprune.masks import Pattern, parse_pattern, pattern_holds, prune_count
from llmprune.models import find_blocks, find_linears, get_weight
from llmprune.solvers import make_solver

PATTERNS = [("unstructured", Pattern(), 0.5), ("2:4", Pattern(2, 4), 0.5), ("4:8", Pattern(4, 8), 0.5)]


def windows(n=6, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def expected_zeros(method, shape, sparsity, pattern):
    rows, cols = shape
    if pattern.structured:
        return rows * cols * (pattern.m - pattern.n) // pattern.m
    if method == "wanda":
        return rows * prune_count(cols, sparsity)
    if method == "sparsegpt":
        return round(sparsity * rows * cols)
    return prune_count(rows * cols, sparsity)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "alps", "admm"])
@pytest.mark.parametrize("name,pattern,sparsity", PATTERNS)
def test_every_linear_is_pruned_exactly(arch, method, name, pattern, sparsity, tmp_path):
    model = tiny_model(arch)
    ignore = (r"\.0\..*(down_proj|fc2|c_proj|dense)$",)  # a block-0 output projection stays dense
    _, blocks = find_blocks(model)
    before = {n: get_weight(m).clone() for i, b in enumerate(blocks) for n, m in find_linears(b, f"b.{i}").items()}
    ids = windows()
    results = calibrate.prune_model(model, ids, plan_for(model, ids, method=method, sparsity=sparsity, pattern=pattern,
                                                        ignore=ignore, microbatch=4))
    blocks_name, blocks = find_blocks(model)
    all_linears = {n: m for i, b in enumerate(blocks) for n, m in find_linears(b, f"{blocks_name}.{i}").items()}
    pruned = {r.name for r in results}
    ignored = set(all_linears) - pruned
    assert 1 <= len(ignored) <= 2 and all(".0." in n for n in ignored)
    assert len(pruned) >= 3 * len(blocks)
    for name_, module in all_linears.items():
        W = get_weight(module)
        if name_ in ignored:
            assert int((W == 0).sum()) == 0, f"{name_} was ignored but changed"
            continue
        assert int((W == 0).sum()) == expected_zeros(method, W.shape, sparsity, pattern), name_
        assert pattern_holds(W, pattern), name_
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    logits = reloaded(windows(2, 16)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_reproduces_the_models_own_hidden_states(arch):
    """Capture + block-by-block propagation equals the model's forward (per-block masks included:
    Gemma3's sliding-window layer gets its own mask, its window 16 < seqlen 40)."""
    model = tiny_model(arch)
    ids = windows(5, 40)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
        _, blocks = find_blocks(model)
        cache = ActivationCache.capture(model, blocks, list(ids.split(2)), torch.device("cpu"))
        for i, block in enumerate(blocks[:-1]):
            hidden = torch.cat([run_block(block, i, cache, k) for k in range(len(cache))])
            for k, out in enumerate(hidden.split(2)):
                cache.update(k, out)
            torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_same_inputs_same_masks(method, sequential):
    masks = []
    for _ in range(2):
        model = tiny_model("llama")
        ids = windows()
        calibrate.prune_model(model, ids, plan_for(model, ids, method=method, sparsity=0.5, sequential=sequential,
                                                   microbatch=2))
        masks.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_microbatch_size_does_not_change_sequential_masks():
    results = []
    for microbatch in (1, 3, 6):
        model = tiny_model("qwen2")
        ids = windows()
        calibrate.prune_model(model, ids, plan_for(model, ids, method="wanda", pattern="2:4", microbatch=microbatch))
        results.append([(p == 0) for p in model.parameters()])
    for other in results[1:]:
        agreement = sum(int((a == b).sum()) for a, b in zip(results[0], other)) / sum(a.numel() for a in results[0])
        assert agreement > 0.999  # float summation order may flip an exact tie at most


def test_sequential_calibrates_on_pruned_upstream_inputs():
    """In sequential mode o_proj's statistics see the pruned q/k/v; in two-pass mode they do not."""
    seen = {}
    for sequential in (True, False):
        model = tiny_model("llama")
        ids = windows()
        calibrate.prune_model(model, ids, plan_for(model, ids, method="wanda", sparsity=0.5, sequential=sequential))
        seen[sequential] = get_weight(model.model.layers[0].self_attn.o_proj).clone()
    assert not torch.equal(seen[True], seen[False])
    # q/k/v see the same (dense) block input either way
    for sequential in (True, False):
        model = tiny_model("llama")
        ids = windows()
        calibrate.prune_model(model, ids, plan_for(model, ids, method="wanda", sparsity=0.5, sequential=sequential))
        seen[("q", sequential)] = get_weight(model.model.layers[0].self_attn.q_proj).clone()
    assert torch.equal(seen[("q", True)], seen[("q", False)])


def test_qkv_share_one_solver():
    model = tiny_model("llama")
    ids = windows()
    results = calibrate.prune_model(model, ids, plan_for(model, ids, method="sparsegpt", sparsity=0.5))
    shares = {r.name.split(".", 3)[-1]: r.shares_statistics_with for r in results if ".layers.0." in r.name}
    assert shares["self_attn.k_proj"] == shares["self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert shares["mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert shares["self_attn.q_proj"] is None and shares["mlp.down_proj"] is None


def test_per_linear_sparsity_function():
    model = tiny_model("llama")
    ids = windows()
    results = calibrate.prune_model(model, ids, plan_for(model, ids, method="wanda", sparsity=0.5,
                                                        overrides={"mlp": 0.25}))
    for r in results:
        assert r.sparsity == pytest.approx(0.25 if "mlp" in r.name else 0.5)


def test_grouped_solves_change_nothing(monkeypatch):
    """q/k/v (and gate/up) are solved in one column loop, predicted from the previous block in the
    sequential schedule; the weights must equal solving each linear on its own."""
    from llmprune.solvers.sparsegpt import SparseGPTSolver

    weights, sizes = {}, []
    stacked = SparseGPTSolver.prune_many
    monkeypatch.setattr(SparseGPTSolver, "prune_many",
                        lambda self, ws, ss, p: (sizes.append(len(ws)), stacked(self, ws, ss, p))[1])
    for grouped in (True, False):
        if grouped:
            model = tiny_model("llama")
            ids = windows()
            calibrate.prune_model(model, ids, plan_for(model, ids, method="sparsegpt", pattern="2:4", microbatch=2))
            assert sorted(sizes) == [2, 3]  # sequential: block 0 (solved one by one) teaches block 1 its groups
        if not grouped:
            monkeypatch.setattr(SparseGPTSolver, "prune_many",
                                lambda self, ws, ss, p: [self.prune(w, s, p) for w, s in zip(ws, ss)])
        for sequential in (True, False):
            model = tiny_model("llama")
            ids = windows()
            calibrate.prune_model(model, ids, plan_for(model, ids, method="sparsegpt", pattern="2:4",
                                                       sequential=sequential, microbatch=2))
            weights[grouped, sequential] = [p.detach().clone() for p in model.parameters()]
    for sequential in (True, False):
        for a, b in zip(weights[True, sequential], weights[False, sequential]):
            assert torch.equal(a == 0, b == 0)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # GEMM blocking may reorder sums


def test_a_wrongly_predicted_group_is_solved_again():
    """A linear predicted to share the leader's input but fed another tensor gets its own statistics."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    x_a, x_b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g) * 5
    pruner = calibrate.BlockPruner({"a": a, "b": b}, "sparsegpt", lambda n: 0.5, Pattern(), "cpu", {"a": ["b"]})
    expected = make_solver("sparsegpt", 16)
    expected.add_batch(x_b)
    expected = expected.prune(b.weight.data.clone(), 0.5, Pattern())
    pruner.observe("a", x_a)
    pruner.prune_all(["a"])
    assert "b" in pruner._stashed  # solved together with a, on a's statistics
    pruner.observe("b", x_b)
    pruner.prune_all(["b"])
    assert torch.equal(b.weight.data, expected)
    assert [r.shares_statistics_with for r in pruner.results] == [None, None]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "alps"])
@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.6), (Pattern(2, 4), 0.5)])
def test_dsnot_after_any_solver_keeps_counts_and_patterns(arch, method, pattern, sparsity):
    model = tiny_model(arch)
    ids = windows()
    results = calibrate.prune_model(model, ids, plan_for(model, ids, method=method, sparsity=sparsity, pattern=pattern,
                                                        microbatch=4, refine="dsnot", dsnot_threshold=0.0))
    blocks_name, blocks = find_blocks(model)
    linears = {n: m for i, b in enumerate(blocks) for n, m in find_linears(b, f"{blocks_name}.{i}").items()}
    assert {r.name for r in results} == set(linears)
    for r in results:
        W = get_weight(linears[r.name])
        assert int((W == 0).sum()) == expected_zeros(method, W.shape, sparsity, pattern), r.name
        assert pattern_holds(W, pattern), r.name
        assert r.refine is not None and r.refine["error_after"] <= r.refine["error_before"]
    if method not in ("sparsegpt", "alps"):  # after their weight updates a swap seldom lowers the error: may change nothing
        assert sum(r.refine["rows_refined"] for r in results) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_outlier_ratios_leave_the_model_unchanged(arch):
    model = tiny_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = windows()
    ratios, sizes = calibrate.outlier_ratios(model, ids, plan_for(model, ids, method="wanda", sparsity=0.5, owl_m=2.0,
                                                                  microbatch=4))
    _, blocks = find_blocks(model)
    assert len(ratios) == len(blocks) == len(sizes)
    assert all(0 <= r < 1 for r in ratios) and any(r > 0 for r in ratios)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_placed_moves_a_block_to_the_device_and_back(monkeypatch):
    """The placement contract: on the compute device inside, back home after, also on an error; nothing moves where
    home is the compute device. (The old helper compared `module.to(...)`'s return, the module itself, with the
    module, so blocks never went back: on a GPU the whole model piled up on the device.)"""
    block = torch.nn.Linear(4, 4)
    moves = []
    monkeypatch.setattr(torch.nn.Linear, "to", lambda self, device: (moves.append(str(device)), self)[1], raising=False)
    with calibrate.placed(block, torch.device("cpu")):
        pass
    assert moves == []
    with calibrate.placed(block, torch.device("cuda:1")):
        assert moves == ["cuda:1"]
    assert moves == ["cuda:1", "cpu"]
    with pytest.raises(ValueError):
        with calibrate.placed(block, torch.device("cuda:1")):
            raise ValueError("a failing solve")
    assert moves == ["cuda:1", "cpu", "cuda:1", "cpu"]


@pytest.mark.parametrize("schedule", ["sequential", "two-pass", "owl"])
def test_every_block_is_placed_while_it_runs(monkeypatch, schedule):
    """The loop runs each block inside `placed` (pruning and OWL's dense pass alike), one block at a time."""
    from contextlib import contextmanager

    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    inside, log = [], []
    real = calibrate.loop.placed

    @contextmanager
    def recording(module, device):
        assert not inside, "two blocks on the device at once"
        index = [b is module for b in blocks].index(True)
        inside.append(index)
        with real(module, device):
            yield module
        inside.pop()
        log.append(index)

    monkeypatch.setattr(calibrate.loop, "placed", recording)
    windows = torch.randint(0, VOCAB, (4, 16))
    if schedule == "owl":
        calibrate.outlier_ratios(model, windows, plan_for(model, windows, method="wanda", sparsity=0.5))
    else:
        calibrate.prune_model(model, windows, plan_for(model, windows, method="wanda", sparsity=0.5,
                                                       sequential=schedule == "sequential"))
    assert log == list(range(len(blocks)))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_attention_gives_every_block_the_outputs_of_sdpa(arch, monkeypatch):
    """The calibration forward's causal attention cut into query chunks (attention.py) changes no block output
    beyond rounding, on every architecture (Gemma-3's 16-token sliding window included, with 200 tokens), and
    leaves the configs as it found them."""
    import transformers.integrations.sdpa_attention as sdpa
    from llmprune.calibrate import attention

    model = tiny_model(arch)
    model.config._attn_implementation = "sdpa"
    _, blocks = find_blocks(model)
    calls = {"chunk": 0, "whole": 0}
    whole = sdpa.sdpa_attention_forward

    def counting(module, query, *args, **kwargs):
        calls["chunk" if query.shape[2] <= attention.CHUNK else "whole"] += 1
        return whole(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", counting)
    with torch.no_grad():
        cache = ActivationCache.capture(model, blocks, [windows(3, 2 * attention.CHUNK + 72)], torch.device("cpu"))
        for i, block in enumerate(blocks):
            expected = run_block(block, i, cache, 0)
            with attention.chunked_attention(blocks, torch.device("cpu")):
                got = run_block(block, i, cache, 0)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (arch, i, (got - expected).abs().max())
    assert model.config._attn_implementation == "sdpa"
    if arch == "gemma3":  # its 16-token window (layer 0) is cut into chunks of 64 queries: 200 queries, 4 chunks
        assert calls["chunk"] == 4, calls


def test_a_causal_boolean_mask_goes_as_is_causal(monkeypatch):
    """A boolean mask that is exactly the causal triangle (Gemma-3's window at a sequence no longer than it) reaches
    the kernel as is_causal with no mask, which torch's CPU kernel computes without the blocks above the diagonal."""
    import transformers.integrations.sdpa_attention as sdpa

    from llmprune.calibrate.attention import CHUNK, chunked_sdpa

    seen = []
    whole = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward",
                        lambda m, q, k, v, mask, **kw: seen.append((mask, kw.get("is_causal"))) or whole(m, q, k, v, mask, **kw))
    module = tiny_model("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, heads, 3 * CHUNK, 16, generator=g) for heads in (4, 2, 2))
    causal = torch.ones(3 * CHUNK, 3 * CHUNK, dtype=torch.bool).tril().expand(3, 1, 3 * CHUNK, 3 * CHUNK)
    got, _ = chunked_sdpa(module, q, k, v, causal, scaling=0.25)
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1] is True
    expected, _ = whole(module, q, k, v, causal, scaling=0.25)
    assert torch.allclose(got, expected, atol=1e-6)


def test_chunked_attention_runs_whole_where_sequences_differ():
    """A padding mask that differs between sequences is not cut: the call is transformers' own, unchanged. A shared
    causal triangle (is_causal) and a shared window (chunks) give transformers' values to rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llmprune.calibrate.attention import CHUNK, chunked_sdpa

    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 2 * CHUNK, 16, generator=g) for heads in (4, 2, 2))
    causal = torch.ones(2 * CHUNK, 2 * CHUNK, dtype=torch.bool).tril()
    mask = causal.repeat(2, 1, 1, 1)
    mask[1, :, 5:, :5] = False  # the second sequence's later tokens do not see its first 5 (padding)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = chunked_sdpa(module, q, k, v, mask, scaling=0.25)
    assert torch.equal(got, expected)
    window = causal & ~torch.ones_like(causal).tril(-40)  # a 40-token window, one mask for both: cut into chunks
    for shared in (causal, window):  # the plain triangle goes as is_causal; both the same to rounding
        shared = shared.expand(2, 1, 2 * CHUNK, 2 * CHUNK)
        expected, _ = sdpa_attention_forward(module, q, k, v, shared, scaling=0.25)
        got, _ = chunked_sdpa(module, q, k, v, shared, scaling=0.25)
        assert torch.allclose(got, expected, atol=1e-6)


def test_the_last_block_stops_once_its_last_linear_is_pruned():
    """Nothing reads the last block's outputs: the sequential schedule unwinds its micro-batches once its last linear
    (down_proj) is pruned, so that linear's forward never runs there, while the block before still runs whole."""
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    ran = {i: 0 for i in range(len(blocks))}
    for i, block in enumerate(blocks):
        block.mlp.down_proj.register_forward_hook(lambda *_, i=i: ran.__setitem__(i, ran[i] + 1))
    ids = windows()
    results = calibrate.prune_model(model, ids, plan_for(model, ids, method="sparsegpt", sparsity=0.5, microbatch=2))
    assert ran[0] == 3 and ran[len(blocks) - 1] == 0, ran  # 6 windows in micro-batches of 2
    assert {r.name for r in results} >= {f"model.layers.{len(blocks) - 1}.mlp.down_proj"}
    assert int((blocks[-1].mlp.down_proj.weight == 0).sum()) == blocks[-1].mlp.down_proj.weight.numel() // 2
