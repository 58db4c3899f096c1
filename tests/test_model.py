import torch

from geobench.api import ModelConfig
from geobench.plugins.models.gpt import GPT, LAYOUT


def test_paper_size_is_51m_with_trunk_25m():
    with torch.device("meta"):
        model = GPT(ModelConfig(), vocab_size=50257)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert abs(total - 51.0e6) < 0.1e6, total
    assert sum(params[n].numel() for n in LAYOUT.trunk_names(list(params))) == 25_165_824
    assert len(LAYOUT.trunk_names(list(params))) == 8 * 4
    assert LAYOUT.block_indices(list(params)) == list(range(8))
    per_block = sum(params[n].numel() for n in LAYOUT.block_names(list(params), 3))
    assert per_block == 3_145_728 + 4 * 512  # trunk matrices plus two LayerNorms


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, context=12, **kw), vocab_size=50)


def test_embeddings_are_tied_and_linears_have_no_bias():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # listed once, as wte.weight
    assert not [n for n in names if n.endswith(".bias") and ".ln" not in n and not n.startswith("ln_f")]


def test_init_follows_spec():
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=256, d_ff=512, context=64), vocab_size=1000)
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 1e-3
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert torch.all(model.blocks[1].ln1.weight == 1) and torch.all(model.blocks[1].ln1.bias == 0)


def test_attention_is_causal():
    model = tiny_model().eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_layernorm_and_bias_take_no_decay():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    parameters = LAYOUT.parameters(model)
    assert {p.name: p.role for p in parameters if p.role != "matrix"} == {
        "wte.weight": "embedding", "wpe.weight": "embedding",
        **{n: "norm" for n, t in model.named_parameters() if t.ndim < 2}}
    decaying, plain = parameters.groups(weight_decay=0.5)
    decayed = {names[id(p)] for p in decaying["params"]}
    assert decaying["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert "blocks.0.ln1.weight" not in decayed and "ln_f.bias" not in decayed
    assert "wte.weight" in decayed and "blocks.1.attn.qkv.weight" in decayed
    assert len(decayed) + len(plain["params"]) == len(names)
